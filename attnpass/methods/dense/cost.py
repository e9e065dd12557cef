"""Dense attention's cost (attnpass.cost_model; `DenseAttention.cost_formulas`).

Every (query, key) pair is computed, and the Lq x Lk scores are written and read once (what fused
kernels avoid). No parameter.
"""
from __future__ import annotations

from attnpass.cost_model import PAIR, Lk, Lq, io_bytes

OPTIONS: tuple[str, ...] = ()
LEGEND = ""


def per_head(itemsize: int, options: dict):
    """({}, flops, bytes) of one batch element and query head."""
    return {}, Lq * Lk * PAIR, io_bytes(itemsize) + itemsize * 2 * Lq * Lk
