"""Sparsefinder's cost (attnpass.cost_model; `SparsefinderAttention.cost_formulas`), in its
projected rank r and the density rho of its predicted graph (learned, so an input, not a minimiser).

Sparsefinder counts the projections (D -> r for every query and key), its predictor (distance:
all Lq*Lk pairs in r dims; quantization: a sort per projected dim and each query's r buckets;
clustering: every token against every centroid), the merge sort of the predicted pairs and
entmax-1.5 attention over rho * Lq * Lk of them. The blocks predictor has no projection: it counts
its sampled queries' exact logits (`sampled_queries` per `block` queries, against every key) and
attention over its blocks (rho = top_blocks * block / Lk), with no merge sort.
"""
from __future__ import annotations

import sympy

from attnpass.cost_model import INDEX_BYTES, PAIR, D, Lk, Lq, given, io_bytes, r, rho
from attnpass.methods.sparsefinder import DEFAULTS, PREDICTOR_CHOICES as PREDICTORS

OPTIONS = ("predictor", "rank", "density", "clusters", "bucket_size", "block", "sampled_queries")
LEGEND = ""


def _unknown_predictor(predictor) -> ValueError:
    return ValueError(f"unknown sparsefinder predictor {predictor!r}; expected one of {list(PREDICTORS)}")


def check_options(options: dict) -> None:
    predictor = options.get("predictor") or DEFAULTS["predictor"]
    if predictor not in PREDICTORS:
        raise _unknown_predictor(predictor)


def _flops_bytes(predictor: str, itemsize: int, clusters, bucket_size, block, samples) -> tuple[sympy.Expr, sympy.Expr]:
    """(flops, bytes) of one batch element and query head, in r and rho."""
    edges = rho * Lq * Lk
    if predictor == "blocks":
        # whole query blocks: ceil(Lq / block) blocks of `samples` scored queries and `block` query
        # slots, bounded above by Lq / block + 1 (so a decode step's one query costs a whole block)
        groups = Lq / block + 1
        sampled, pairs = groups * samples, groups * block * rho * Lk
        flops = sampled * Lk * (2 * D + 1) + 3 * sampled * Lk / block + pairs * PAIR
        return flops, io_bytes(itemsize) + pairs * itemsize * 2 * D + groups * rho * Lk * INDEX_BYTES
    projection = 2 * D * r * (Lq + Lk)
    if predictor == "distance":
        predict = (3 * r + 1) * Lq * Lk
    elif predictor == "quantization":
        predict = r * (Lq * sympy.log(Lq, 2) + Lk * sympy.log(Lk, 2)) + r * Lq * bucket_size
    elif predictor == "clustering":
        predict = (Lq + Lk) * clusters * (3 * r + 1)
    else:
        raise _unknown_predictor(predictor)
    flops = projection + predict + edges * sympy.log(edges, 2) + edges * PAIR
    return flops, io_bytes(itemsize) + edges * (itemsize * 2 * D + 2 * INDEX_BYTES) + itemsize * 2 * D * r


def per_head(itemsize: int, options: dict):
    """(params, flops, bytes) of one batch element and query head, at the method's defaults for the
    predictor, rank, clusters and bucket size; rho unless `density` is given."""
    predictor = options.get("predictor") or DEFAULTS["predictor"]
    flops, nbytes = _flops_bytes(predictor, itemsize, options.get("clusters") or DEFAULTS["clusters"],
                                 options.get("bucket_size") or DEFAULTS["bucket_size"],
                                 options.get("block") or DEFAULTS["block"],
                                 options.get("sampled_queries") or DEFAULTS["sampled_queries"])
    if predictor == "blocks":  # no projection: no rank to report
        return given(flops, nbytes, options, {"density": rho},
                     params={"predictor": predictor, "block": options.get("block") or DEFAULTS["block"],
                             "sampled_queries": options.get("sampled_queries") or DEFAULTS["sampled_queries"]})
    return given(flops, nbytes, {"rank": DEFAULTS["rank"], **options}, {"rank": r, "density": rho},
                 params={"predictor": predictor})


