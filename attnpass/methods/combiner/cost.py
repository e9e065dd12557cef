"""Combiner's cost (attnpass.cost_model; `CombinerAttention.cost_formulas`), in its block s.

Each query computes the keys of its own block directly and one region summary per other region
(a summary read costs the same as a key); the summaries are max-pools of q and k, and each summary
value is the pooled query's attention over its region. The variants differ in their regions (see
`combiner.layout`): fixed, one per block of s keys; axial, one per column of an (Lk / s) x s grid;
logsparse, one per dyadic level.
"""
from __future__ import annotations

import sympy

from attnpass import cost_model
from attnpass.cost_model import INDEX_BYTES, PAIR, D, Lk, Lq, s
from attnpass.methods.combiner.layout import VARIANTS

OPTIONS = ("variant", "block")
LEGEND = "s block"
# Logsparse's FLOPs are minimised by a constant block of ~3 keys (d/ds of Lq*s - (Lq+Lk)*log2(Lk/s)),
# far too small for tiled kernels; this block keeps tiles efficient and is what the default uses.
LOGSPARSE_BLOCK = 64


def _unknown_variant(variant) -> ValueError:
    return ValueError(f"unknown combiner variant {variant!r}; expected one of {list(VARIANTS)}")


def check_options(options: dict) -> None:
    variant = options.get("variant", "fixed")
    if variant not in VARIANTS:
        raise _unknown_variant(variant)


def _flops_bytes(variant: str, itemsize: int) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of one batch element and query head, in s."""
    regions = Lk / s
    if variant == "fixed":
        # own block directly, one summary per other block; pooling; each summary value is the
        # pooled query's attention over its block (Lk pairs in all)
        flops = Lq * s * PAIR + Lq * regions * PAIR + (Lq + Lk) * D + Lk * PAIR
        summaries = itemsize * 2 * regions * D
    elif variant == "axial":
        # own row directly (s keys), one summary per column (s); summary values: rows x cols
        # regions of up to `rows` keys each
        rows = Lk / s
        flops = Lq * s * PAIR + Lq * s * PAIR + 2 * (Lq + Lk) * D + Lk * rows * PAIR
        summaries = itemsize * 2 * Lk * D
    elif variant == "logsparse":
        # own block directly, one summary per dyadic level; every level's summaries cover Lk keys
        levels = sympy.log(regions, 2)
        flops = Lq * s * PAIR + Lq * levels * PAIR + (Lq + Lk) * levels * D + Lk * levels * PAIR
        summaries = itemsize * 2 * 2 * regions * D
    else:
        raise _unknown_variant(variant)
    gathered = itemsize * (Lq + 2 * Lk) * D + INDEX_BYTES * (Lq + Lk)
    return flops, cost_model.io_bytes(itemsize) + gathered + summaries


def per_head(itemsize: int, options: dict):
    """(params, flops, bytes) of one batch element and query head; s unless `block` is given."""
    variant = options.get("variant", "fixed")
    flops, nbytes = _flops_bytes(variant, itemsize)
    return cost_model.given(flops, nbytes, options, {"block": s}, params={"variant": variant})


def default_options(len_q: int | None, len_k: int | None, head_dim: int | None, options: dict) -> dict:
    """The block minimising the FLOPs when the lengths are known and none is given."""
    if len_q is not None and options.get("block") is None:
        options = {**options, "block": cost_model.default_block(len_q, len_k, head_dim, options.get("variant", "fixed"))}
    return options


def optimum(variant: str) -> sympy.Expr:
    """The FLOPs' minimiser in s (fixed: sqrt(Lk); axial: sqrt(Lk^2 / 2Lq)); logsparse: LOGSPARSE_BLOCK."""
    if variant == "logsparse":
        return sympy.Integer(LOGSPARSE_BLOCK)
    return cost_model.minimiser(_flops_bytes(variant, 4)[0], s, f"combiner/{variant}")
