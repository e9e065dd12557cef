"""Pattern families: each reads one family of attention spellings from an FX graph.

A family is a function `match(node) -> SiteMatch | None` that raises `Skip(reason)` for a site
it recognises but cannot rewrite exactly, and `NotAttention` (or returns None) otherwise. They
read the graph only through `attnpass.frontend.graph_ops.view`, so the same files serve the
`torch.export` graph and the graph a `torch.compile` backend receives.
"""
from attnpass.patterns.common import NotAttention, Skip
from attnpass.patterns.sdpa import match_sdpa
from attnpass.patterns.softmax_chain import match_softmax_chain

FAMILIES = (match_sdpa, match_softmax_chain)

__all__ = ["FAMILIES", "NotAttention", "Skip", "match_sdpa", "match_softmax_chain"]
