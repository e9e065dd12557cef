"""method="dense": the canonical attention op with the model's own semantics (the correctness anchor)."""
from __future__ import annotations

import torch

import attnpass.lowering.cpu.dense  # noqa: F401 - registers torch.ops.attnpass.attention
from attnpass.methods.base import SiteAttention, SiteSpec


class DenseAttention(SiteAttention):
    method_name = "dense"

    def __init__(self, spec: SiteSpec, **options):
        self.validate_options(**options)
        super().__init__(spec)

    def forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                empty_rows: str = "zero"):
        p = dropout_p if self.training else 0.0
        # Training draws SDPA's own dropout (seed -1): the fused kernel's stream, equal in
        # distribution to the original model's. The hashed stream (seed >= 0) is for checking
        # sparse kernels against the dense op pair by pair, which this method does not serve.
        return torch.ops.attnpass.attention(
            q, k, v, bias, mask, key_keep, self.scale(q), self.spec.causal,
            self.causal_offset(q, k), p, -1 if p > 0.0 else 0,
            empty_rows, self.spec.sdpa_semantics,
        )
