"""SBM's cost (attnpass.cost_model; `SBMAttention.cost_formulas`), in its cluster count k and
edge density rho (the expected share of pairs its graph holds: learned, so an input, not a minimiser).

SBM counts phi on every query and key (two D x D layers), the memberships (k per token), fastRG
sampling (three inverse-CDF lookups per edge, log2 of the table size each, and the merge sort of the
edges) and attention over rho * Lq * Lk edges, whose q, k, v rows the edge kernel gathers.
"""
from __future__ import annotations

import sympy

from attnpass.cost_model import INDEX_BYTES, PAIR, D, Lk, Lq, given, io_bytes, k, rho
from attnpass.methods.sbm import DEFAULT_CLUSTERS

OPTIONS = ("clusters", "density")
LEGEND = "k clusters, rho edge density"


def _flops_bytes(itemsize: int) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of one batch element and query head, in k and rho."""
    edges = rho * Lq * Lk
    sampling = 3 * sympy.log(Lk * k, 2) + sympy.log(edges, 2)  # per edge: lookups + merge sort
    flops = ((Lq + Lk) * (4 * D**2 + 2 * D * k) + 2 * k**2 * D + (Lq + Lk) * k
             + edges * (sampling + PAIR))
    gathered = edges * (itemsize * 3 * D + 2 * INDEX_BYTES) + 8 * (Lq + Lk) * k  # + float64 CDFs
    return flops, io_bytes(itemsize) + gathered + itemsize * (k * D + 2 * D**2)


def per_head(itemsize: int, options: dict):
    """(params, flops, bytes) of one batch element and query head; k and rho unless given."""
    flops, nbytes = _flops_bytes(itemsize)
    return given(flops, nbytes, options, {"clusters": k, "density": rho})


def default_options(len_q: int | None, len_k: int | None, head_dim: int | None, options: dict) -> dict:
    """SBM's default cluster count when none is given (whatever the lengths); the density stays rho."""
    if options.get("clusters") is None:
        options = {**options, "clusters": DEFAULT_CLUSTERS}
    return options

