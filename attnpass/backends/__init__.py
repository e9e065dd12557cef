"""The ways a rewritten model leaves attnpass: a torch.compile backend and the ONNX export."""
