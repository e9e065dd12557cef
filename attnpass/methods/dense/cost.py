"""Dense attention's cost (attnpass.cost_model; `DenseAttention.cost_formulas`).

Every (query, key) pair is computed, and the Lq x Lk scores are written and read once (what fused
kernels avoid). No parameter.
"""
from __future__ import annotations

from attnpass.cost_model import PAIR, D, Lk, Lq

OPTIONS: tuple[str, ...] = ()
LEGEND = ""


def check_options(options: dict) -> None:
    pass


def per_head(itemsize: int, options: dict):
    """({}, flops, bytes) of one batch element and query head."""
    io = itemsize * (2 * Lq * D + 2 * Lk * D)  # read q, k, v; write the output
    return {}, Lq * Lk * PAIR, io + itemsize * 2 * Lq * Lk


def default_options(len_q: int | None, len_k: int | None, head_dim: int | None, options: dict) -> dict:
    return options


def optimum(variant: str) -> None:
    return None
