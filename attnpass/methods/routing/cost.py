"""Routing's cost (attnpass.cost_model; `RoutingAttention.cost_formulas`), in its cluster count c.

Routing counts every slot of the tiles its two grouped-kernel calls compute: c clusters of Lq/c
query slots by Lk/c key slots, and the local-window fallback, one tile per block of P = `local_window`
query positions. A block's tile holds the block's fallback queries, those no cluster took (with
balanced top-w every cluster leaves a query out with probability about 1 - 1/c, so about
(1 - 1/c)^c ~ 1/e of them), as rows and the union of their windows as key slots: 2P - 1 for P
consecutive queries, so the fallback costs Lq (2P - 1) / e pairs. The kernel cuts each block's
fallback queries into tiles of T rows (T chosen per call: the fullest block's count, P/2 or P/4) and pads every batch row
and head to the same tile count, so a call computes somewhat more (about T/2 rows per block, more
when one head has more fallback queries than the others), at most Lq (2P - 1); the option
`fallback_share` sets the tiles' rows as a share of Lq (e.g. a call's own, from
`RoutingAttention.layout`: tiles x rows / Lq). With keys='members', every query is scored against
Lk / NEED_BLOCK mean-pooled key blocks to choose which members to sample, and `sampled_queries` s per
cluster against every key to choose its keys: c s Lk more pairs (score and softmax, no value
product). `refit_steps` n Lloyd steps on the call's own tokens (the queries with keys='members', queries
and keys otherwise) cost n times a similarity, a comparison and a sum per token and centroid.
Routing's optional local heads are not counted, nor the unequal cluster sizes of queries='nearest'
(the kernel pads every cluster to the largest, and a cluster's keys and samples follow its size: the
pairs counted here are those of equal sizes, a lower bound).
"""
from __future__ import annotations

import sympy

from attnpass import cost_model
from attnpass.cost_model import INDEX_BYTES, PAIR, D, Lk, Lq, c
from attnpass.methods.routing import DEFAULT_LOCAL_WINDOW
from attnpass.methods.routing.member_keys import NEED_BLOCK

OPTIONS = ("clusters", "local_window", "fallback_share", "sampled_queries", "refit_steps")
LEGEND = "c clusters"
# Rows of routing's fallback tiles as a share of the queries: the expected share of queries no cluster
# takes (see the module docstring; the padded tiles hold a little more).
DEFAULT_FALLBACK_SHARE = sympy.exp(-1)


def check_options(options: dict) -> None:
    share = options.get("fallback_share")
    if isinstance(share, (int, float)) and not 0 <= share <= 1:
        raise ValueError(f"routing's fallback_share={share!r} must be in [0, 1] (a share of the queries)")


def _flops_bytes(itemsize: int, local_window: int, fallback_share, sampled_queries: int,
                 refit_steps: int) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of one batch element and query head, in c."""
    # similarities of every query and key to every centroid, top-w selection (one comparison
    # per candidate), then the kernels' tiles (module docstring): c clusters of Lq/c query by
    # Lk/c key slots, and per block of P = local_window positions the fallback's rows against
    # the 2P - 1 keys of their windows
    fallback_rows, fallback_keys = fallback_share * Lq, (2 * local_window - 1) * Lq / local_window
    pairs = (Lq / c) * (Lk / c) * c + fallback_rows * (2 * local_window - 1)
    flops = 2 * (Lq + Lk) * c * D + (Lq + Lk) * c + pairs * PAIR
    if sampled_queries:  # keys='members': pooled keys, every query's block scores, the samples' exact rows
        flops += Lk * D + Lq * (Lk / NEED_BLOCK) * (2 * D + 3) + c * sampled_queries * Lk * (2 * D + 5)
    refit_tokens = Lq if sampled_queries else Lq + Lk
    flops += refit_steps * refit_tokens * (2 * c * D + c + D)
    # gathered rows and index slots of both calls (the fallback's key_range: two per row)
    gathered = (itemsize * (Lq + 2 * Lk + fallback_rows + 2 * fallback_keys) * D
                + INDEX_BYTES * (Lq + Lk + 3 * fallback_rows + fallback_keys))
    return flops, cost_model.io_bytes(itemsize) + gathered + itemsize * c * D


def per_head(itemsize: int, options: dict):
    """(params, flops, bytes) of one batch element and query head; c unless `clusters` is given."""
    share = options.get("fallback_share")
    flops, nbytes = _flops_bytes(itemsize, options.get("local_window") or DEFAULT_LOCAL_WINDOW,
                                 DEFAULT_FALLBACK_SHARE if share is None else share,
                                 options.get("sampled_queries") or 0, options.get("refit_steps") or 0)
    params, flops, nbytes = cost_model.given(flops, nbytes, options, {"clusters": c})
    if share is not None:
        params["fallback_share"] = share
    return params, flops, nbytes


def default_options(len_q: int | None, len_k: int | None, head_dim: int | None, options: dict) -> dict:
    """The cluster count minimising the FLOPs when the lengths are known and none is given."""
    if len_q is not None and options.get("clusters") is None:
        options = {**options, "clusters": cost_model.default_clusters(len_q, len_k, head_dim)}
    return options


def optimum(variant: str) -> sympy.Expr:
    """The FLOPs' minimiser in c (about sqrt(L)); `variant` is Combiner's and changes nothing here."""
    return cost_model.minimiser(per_head(4, {})[1], c, f"routing/{variant}")
