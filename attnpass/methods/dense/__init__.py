"""method="dense": the canonical attention op with the model's own semantics (the correctness anchor)."""
from __future__ import annotations

import torch

from attnpass.methods.base import SiteAttention, SiteSpec


class DenseAttention(SiteAttention):
    method_name = "dense"
    onnx_lowering = "attnpass.lowering.onnx.dense"
    cost_formulas = "attnpass.methods.dense.cost"

    def __init__(self, spec: SiteSpec, **options):
        self.validate_options(**options)
        super().__init__(spec)

    def computed_pairs(self, q, k, key_keep=None):
        return torch.ones(*q.shape[:3], k.shape[2], dtype=torch.bool, device=q.device), None

    def layout_traces(self, q, k, v, bias, mask, dropout_p: float) -> bool:
        # one op whose offset is a SymInt; a band is built as an (Lq, Lk) mask from the offset as an int
        return not self.spec.window

    def forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                empty_rows: str = "zero"):
        # The hashed dropout stream (seed >= 0) is for checking sparse kernels against the dense op
        # pair by pair, which this method does not serve.
        return self.dense_forward(q, k, v, bias, mask, key_keep, dropout_p, empty_rows)
