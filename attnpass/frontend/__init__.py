"""The front end: capture a model's graph (torch.export), find its attention sites and their
masking, rewrite them into site modules; and run the captured graph."""
