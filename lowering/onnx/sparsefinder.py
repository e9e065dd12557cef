"""ONNX lowering of a Sparsefinder site: node ``attnpass.Sparsefinder`` (clustering predictor) or
``attnpass.SparsefinderQuantization`` (quantization predictor), one per site. The distance
predictor is refused: it tests every pair (its body would be the Lq x Lk tensor).

Node: ``Sparsefinder(q, k, v, bias, mask, key_keep, w_q, w_k, centroids) -> out`` with attributes
``scale`` (float), ``causal`` (int), ``bottom_right`` (int: causal offset Lk - Lq, derived from the
shapes in the body, else 0), ``entmax15`` (int: 1 = entmax-1.5, 0 = softmax; the method's
``normalizer``), ``top_clusters`` (int), ``window`` (int, -1 = no window edges) and ``first_token``
(int 0/1). q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); bias (float) and mask (bool)
4-D, broadcastable to (B, Hq, Lq, Lk) (0.0 / True when the site has none; read only at the
candidate pairs); key_keep (B, Lk) bool; w_q, w_k (Hq, D, r) the trained projections and
centroids (Hq, c, r) the site's k-means centroids, stored in the file as initializers.

Semantics = `methods/sparsefinder.py` in eval mode with predictor "clustering" (centroids frozen):
qp = q W_Q, kp = k W_K per query head (GQA: kv head h // (Hq / Hkv) with query head h's W_K); a
token's clusters are its `top_clusters` nearest centroids (squared Euclidean, the same formula as
`sparsefinder.predictors.nearest_clusters`); query i and real key j are a predicted pair when they
share a cluster, plus the window pairs |anchor(i) - j| <= window (causal: j in [anchor - window,
anchor]) and the first-token pair (i, 0); pairs the causal rule or key padding forbid are dropped,
the rest is a set (each key once per query). The normaliser (softmax or entmax-1.5) runs over
exactly those pairs, with the bias and mask read at them (a masked pair or a -inf bias gets zero
probability); a query with no allowed pair gets zeros.

Body, without an Lq x Lk tensor: the key clusters as a (B, Hq, c, Lk) membership, each cluster's
member list (keys by position, TopK) padded to the largest cluster M; per query the lists of its
top clusters (GatherND, (B, Hq, Lq, top * M)), then the window and first-token candidates, sorted
per row (TopK over the row's candidates) so that a key listed twice (shared by two of the query's
clusters, or also a window key) is kept once; the key / value rows of the candidates are gathered
((B, Hq, Lq, W, D), W = top * M + window slots) and normalised along W. Entmax-1.5 is the exact
sort-based threshold of the CPU kernel (`row_normalizers.entmax15_stat`: float64 cumulative sums over the sorted
row, the largest r with tau_r <= z_r), not a bisection: W is the candidate count, so sorting it
is cheap. The largest intermediate is (B, Hq, Lq, W, max(D, Dv)); W is at most top * the largest
cluster + 2 window + 2, i.e. the method's own per-query work (a cluster holding most keys makes
the predicted graph itself dense).

Quantization node: ``SparsefinderQuantization(q, k, v, bias, mask, key_keep, w_q, w_k) -> out``,
attributes as above with ``bucket_size`` instead of ``top_clusters``. The candidates are
`sparsefinder.predictors.quantization_slots`' (per projected dim, keys and queries sorted separately
by coordinate with TopK, query rank i in key bucket i * n_buckets // Lq, the bucket's bs keys by
GatherElements): a fixed width of r * bucket_size per query, plus the window and first token, then
the same candidate attention. TopK sorts with ties to the lower index, as torch's stable argsort.

Ties: a token's cluster *set* is what matters, so ties in order are harmless; an exact tie between
its top_clusters-th and next centroid distance is broken by TopK's rule (lowest index) in ONNX and
by torch.topk's (unspecified) in PyTorch. Near ties also depend on the last bits of the projected
distances, which onnxruntime's MatMul may round differently from torch's in float32. Either case
changes a token's clusters, hence its predicted pairs; it needs two centroids at the same distance
to within float32 rounding (identical tokens, or chance).
"""
from __future__ import annotations

import functools
from typing import Optional

import onnx
import torch
from onnxscript import script
from onnxscript import opset18 as op
from torch import Tensor

from attnpass.lowering.onnx.candidates import (
    candidate_scores, causal_rule, cluster_member_keys, key_anchor, masked_entmax15, weighted_values,
)
from attnpass.lowering.onnx import blocks
from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, node_op, pair_bias, pair_mask, static_float
from attnpass.lowering.onnx.dense import masked_softmax, repeat_kv

_INT64, _DOUBLE = onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE
# The blocks predictor is not bound to the method-level node: its own inference code is traced, with
# its two kernel-level ops as nodes (lowering/onnx/blocks.py); it alone takes the anchor's sinks and window.
EXPORTABLE_PREDICTORS = ("clustering", "quantization", "blocks")
_WHY_NOT = {
    "distance": "it tests every (query, key) pair against the threshold, all-pairs by nature, so its ONNX body "
                "would be the Lq x Lk tensor the sparse export exists to avoid",
}


# --------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnpass::sparsefinder", mutates_args=())
def sparsefinder(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                 key_keep: Optional[Tensor], w_q: Tensor, w_k: Tensor, centroids: Optional[Tensor], scale: float,
                 causal: bool, bottom_right: bool, cross: bool, normalizer: str, predictor: str, bucket_size: int,
                 top_clusters: int, window: int, first_token: bool) -> Tensor:
    """A Sparsefinder site's eval-mode attention (clustering predictor with these centroids, or
    quantization with this bucket size) with these projections, exactly as the site module
    computes it (window -1 = None)."""
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sparsefinder import SparsefinderAttention

    heads, dim, rank = w_q.shape
    spec = SiteSpec(name="attnpass::sparsefinder", scale=scale, causal=causal, causal_bottom_right=bottom_right,
                    heads_q=heads, heads_kv=k.shape[1], head_dim=dim, cross=cross)
    options = dict(predictor=predictor, rank=rank, window=None if window < 0 else window, first_token=first_token,
                   normalizer=normalizer)
    if predictor == "clustering":
        options.update(clusters=centroids.shape[1], top_clusters=top_clusters)
    else:
        options.update(bucket_size=bucket_size)
    site = SparsefinderAttention(spec, **options).to(w_q.dtype).eval()  # float64 weights stay float64
    with torch.no_grad():
        site.w_q.copy_(w_q)
        site.w_k.copy_(w_k)
        if predictor == "clustering":
            site.centroids.copy_(centroids)
            site.initialized.fill_(True)
    return site(q, k, v, bias, mask, key_keep)


@sparsefinder.register_fake
def _(q, k, v, bias, mask, key_keep, w_q, w_k, centroids, scale, causal, bottom_right, cross, normalizer, predictor,
      bucket_size, top_clusters, window, first_token):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def check_options(options: dict) -> None:
    predictor = options.get("predictor", "clustering")
    if predictor not in EXPORTABLE_PREDICTORS:
        raise NotImplementedError(f"export_onnx: sparsefinder predictor {predictor!r} cannot be exported to ONNX "
                                  f"in this version: {_WHY_NOT.get(predictor, 'unknown predictor')}; predictors "
                                  f"that export: {list(EXPORTABLE_PREDICTORS)}")
    from attnpass.methods.sparsefinder import resolved_options

    normalizer = resolved_options(options)["normalizer"]
    if predictor == "blocks" and normalizer != "softmax":
        raise NotImplementedError(f"export_onnx: sparsefinder predictor 'blocks' with normalizer {normalizer!r} runs "
                                  "the grouped kernel, which has no ONNX node; export it with normalizer='softmax' "
                                  "(the default with sinks= / local=)")


def takes_anchor(predictor: str) -> bool:
    """Whether a site of this predictor exports with the anchor's sinks and window (`attnpass.methods.anchor`)."""
    return predictor == "blocks"


def nodes_per_site(module) -> int:
    """A block-predictor site exports its choice and its attention (two nodes), the others one node."""
    return 2 if module.predictor == "blocks" else 1


def bind(module) -> None:
    """Make a Sparsefinder site module (of a private copy, in eval mode) call `attnpass::sparsefinder` when
    exported; a block-predictor site keeps its own forward (`blocks.check_site` says whether it exports)."""
    check_options({"predictor": module.predictor, "normalizer": module.normalizer})
    if module.predictor == "blocks":
        blocks.check_site(module)
        return
    if module.predictor == "clustering" and not bool(module.initialized):
        raise ValueError(f"export_onnx: sparsefinder site {module.spec.name!r} has no centroids yet (they are "
                         "initialised by the first call); run or train the model before exporting it")
    module.forward = functools.partial(_export_forward, module)


def _export_forward(module, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                    empty_rows: str = "zero"):
    module._check_shapes(q, k)
    return torch.ops.attnpass.sparsefinder(
        q, k, v, bias, mask, key_keep, module.w_q, module.w_k, getattr(module, "centroids", None),
        float(module.scale(q)), bool(module.spec.causal), bool(module.spec.causal_bottom_right),
        bool(module.spec.cross), module.normalizer, module.predictor, int(module.bucket_size),
        int(module.top_clusters), -1 if module.window is None else int(module.window), bool(module.first_token))


# --------------------------------------------------------------------------------------------
# ONNX side
# --------------------------------------------------------------------------------------------


@script(ATTNPASS, default_opset=op)
def nearest_clusters(x, mu, top):
    """x (B, H, L, r), mu (H, c, r), top (1,) int64 -> (B, H, L, top) indices of the nearest centroids,
    by |x|^2 + |mu|^2 - 2 x.mu as `sparsefinder.predictors.nearest_clusters` computes it."""
    x2 = op.ReduceSum(op.Mul(x, x), [-1], keepdims=1)                              # (B, H, L, 1)
    m2 = op.Unsqueeze(op.ReduceSum(op.Mul(mu, mu), [-1], keepdims=0), [1])       # (H, 1, c)
    dot = op.MatMul(x, op.Transpose(mu, perm=[0, 2, 1]))                          # (B, H, L, c)
    d2 = op.Sub(op.Add(x2, m2), op.Mul(op.CastLike(op.Constant(value_float=2.0), x), dot))
    values, index = op.TopK(d2, top, axis=-1, largest=0, sorted=0)
    return index


@script(ATTNPASS, default_opset=op)
def quantile_bucket_keys(qp, kp, key_keep, bucket_size):
    """qp (B, H, Lq, r), kp (B, H, Lk, r), key_keep (B, Lk), bucket_size (1,) int64 -> (B, H, Lq, r * bs)
    key positions (>= Lk: none) as `sparsefinder.predictors.quantization_slots` defines them: per
    projected dim, real keys sorted by coordinate and cut into buckets of bs consecutive ranks, query
    rank i (queries sorted separately) in bucket i * n_buckets // Lq. TopK sorts ascending with ties
    to the lower index: torch's stable argsort."""
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    one = op.Constant(value_ints=[1])
    lq = op.Shape(qp, start=2, end=3)
    lk = op.Shape(kp, start=2, end=3)
    inf = op.CastLike(op.Constant(value_float=float("inf")), kp)
    kc = op.Where(op.Unsqueeze(key_keep, [1, 2]), op.Transpose(kp, perm=[0, 1, 3, 2]), inf)   # (B, H, r, Lk)
    unused1, key_order = op.TopK(kc, lk, axis=-1, largest=0, sorted=1)                        # rank -> key
    unused2, q_order = op.TopK(op.Transpose(qp, perm=[0, 1, 3, 2]), lq, axis=-1, largest=0, sorted=1)
    ranks = op.Expand(op.Range(zero_i, op.Squeeze(lq, [0]), one_i), op.Shape(q_order))
    q_rank = op.ScatterElements(ranks, q_order, ranks, axis=-1)                               # (B, H, r, Lq)
    n_real = op.Reshape(op.ReduceSum(op.Cast(key_keep, to=_INT64), [1], keepdims=1),
                        op.Constant(value_ints=[-1, 1, 1, 1]))                                # (B, 1, 1, 1)
    n_buckets = op.Div(op.Sub(op.Add(n_real, bucket_size), one), bucket_size)
    q_bucket = op.Div(op.Mul(q_rank, n_buckets), lq)                                          # (B, H, r, Lq)
    slot = op.Add(op.Mul(op.Unsqueeze(q_bucket, [4]), bucket_size),
                  op.Range(zero_i, op.Squeeze(bucket_size, [0]), one_i))                       # (B, H, r, Lq, bs)
    valid = op.Less(slot, op.Unsqueeze(n_real, [4]))
    flat_shape = op.Concat(op.Shape(slot, start=0, end=3), op.Constant(value_ints=[-1]), axis=0)
    col = op.GatherElements(key_order, op.Reshape(op.Min(slot, op.Sub(lk, one)), flat_shape), axis=3)
    col = op.Where(valid, op.Reshape(col, op.Shape(slot)), lk)
    col = op.Transpose(col, perm=[0, 1, 3, 2, 4])                                              # (B, H, Lq, r, bs)
    return op.Reshape(col, op.Concat(op.Shape(col, start=0, end=3), op.Constant(value_ints=[-1]), axis=0))


@script(ATTNPASS, default_opset=op)
def window_keys(lq, lk, offset, not_causal, window, first_token):
    """(Lq, Wl) key positions of the window |anchor(i) - j| <= window (causal: j in [anchor - window,
    anchor]; window < 0: none) and of the first key (first_token 1); >= Lk or < 0 become Lk (none).
    window, first_token: int64 scalars."""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    i_pos = op.Range(zero_i, op.Squeeze(lq, [0]), one_i)                          # (Lq,)
    anchor = key_anchor(i_pos, lq, lk, offset, not_causal)
    has_window = op.GreaterOrEqual(window, zero_i)
    low = op.Where(has_window, op.Neg(window), zero_i)
    high = op.Where(has_window, op.Where(op.Squeeze(not_causal, [0]), op.Add(window, one_i), one_i), zero_i)
    steps = op.Range(low, high, one_i)                                            # (2w + 1,), (w + 1,) causal, or ()
    first = op.Mul(op.Range(zero_i, first_token, one_i), zero_i)                  # (1,) = [0] or ()
    local = op.Concat(op.Add(op.Unsqueeze(anchor, [1]), steps),
                      op.Expand(op.Unsqueeze(first, [0]), op.Concat(lq, one, axis=0)), axis=1)  # (Lq, Wl)
    return op.Where(op.Or(op.Less(local, zero), op.GreaterOrEqual(local, lk)), lk, local)


@script(ATTNPASS, default_opset=op)
def predicted_attention(q, k4, v4, keys, bias, mask, key_keep, offset, not_causal, scale_t, use_entmax, window,
                        first_token):
    """The predictor's candidate keys (B, H, Lq, W) plus the window / first-token keys, each allowed
    key once, normalised by entmax-1.5 (use_entmax) or softmax and applied to the values.
    Both normalisers are computed and one is selected: an ONNX If inside a function would leave
    its output untyped for the checker's shape inference."""
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k4, start=2, end=3)
    local = window_keys(lq, lk, offset, not_causal, window, first_token)          # (Lq, Wl)
    local = op.Expand(local, op.Concat(op.Shape(q, start=0, end=2), op.Shape(local), axis=0))
    cand = op.Concat(keys, local, axis=3)
    logits, allowed, v_g = candidate_scores(q, k4, v4, cand, bias, mask, key_keep, offset, not_causal, scale_t)
    probs = op.Where(use_entmax, masked_entmax15(logits, allowed), masked_softmax(logits, allowed))
    return weighted_values(probs, v_g)                                          # (B, H, Lq, Dv)


@script(ATTNPASS, default_opset=op)
def Sparsefinder(q, k, v, bias, mask, key_keep, w_q, w_k, centroids, scale: float, causal: int, bottom_right: int,
                 entmax15: int, top_clusters: int, window: int, first_token: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    offset, not_causal = causal_rule(q, k, op.Constant(value_int=causal), op.Constant(value_int=bottom_right))

    # --- projections and clusters (the query head's W_K projects its kv head's keys)
    qp = op.MatMul(q, op.CastLike(w_q, q))                                       # (B, H, Lq, r)
    kp = op.MatMul(k4, op.CastLike(w_k, q))                                      # (B, H, Lk, r)
    mu = op.CastLike(centroids, q)
    top = op.Unsqueeze(op.Constant(value_int=top_clusters), [0])
    q_clusters = nearest_clusters(qp, mu, top)                                   # (B, H, Lq, t)
    k_clusters = nearest_clusters(kp, mu, top)                                   # (B, H, Lk, t)
    ids = op.Range(zero_i, op.Squeeze(op.Shape(mu, start=1, end=2), [0]), one_i)  # (c,)
    in_cluster = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(k_clusters, [4]), ids), to=_INT64), [3], keepdims=0)
    real = op.Cast(op.Unsqueeze(key_keep, [1, 2]), to=_INT64)                    # (B, 1, 1, Lk)
    member = op.Mul(op.Transpose(in_cluster, perm=[0, 1, 3, 2]), real)           # (B, H, c, Lk) 0/1, real keys
    cluster_keys = cluster_member_keys(member, q_clusters)                        # (B, H, Lq, t*M), >= Lk: none
    return predicted_attention(q, k4, repeat_kv(v, hq), cluster_keys, bias, mask, key_keep, offset, not_causal,
                               op.CastLike(op.Constant(value_float=scale), q),
                               op.Equal(op.Constant(value_int=entmax15), one_i), op.Constant(value_int=window),
                               op.Constant(value_int=first_token))


@script(ATTNPASS, default_opset=op)
def SparsefinderQuantization(q, k, v, bias, mask, key_keep, w_q, w_k, scale: float, causal: int, bottom_right: int,
                             entmax15: int, bucket_size: int, window: int, first_token: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    offset, not_causal = causal_rule(q, k, op.Constant(value_int=causal), op.Constant(value_int=bottom_right))
    qp = op.MatMul(q, op.CastLike(w_q, q))                                       # (B, H, Lq, r)
    kp = op.MatMul(k4, op.CastLike(w_k, q))                                      # (B, H, Lk, r)
    bucket = op.Unsqueeze(op.Constant(value_int=bucket_size), [0])
    bucket_keys = quantile_bucket_keys(qp, kp, key_keep, bucket)                  # (B, H, Lq, r*bs)
    return predicted_attention(q, k4, repeat_kv(v, hq), bucket_keys, bias, mask, key_keep, offset, not_causal,
                               op.CastLike(op.Constant(value_float=scale), q),
                               op.Equal(op.Constant(value_int=entmax15), op.Constant(value_int=1)),
                               op.Constant(value_int=window), op.Constant(value_int=first_token))


SPARSEFINDER_NODE = node_op(
    "Sparsefinder",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("w_q", "T"), ("w_k", "T"), ("centroids", "T")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("entmax15", "int"),
                ("top_clusters", "int"), ("window", "int"), ("first_token", "int")],
    outputs=[("out", "T")],
)

QUANTIZATION_NODE = node_op(
    "SparsefinderQuantization",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("w_q", "T"), ("w_k", "T")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("entmax15", "int"),
                ("bucket_size", "int"), ("window", "int"), ("first_token", "int")],
    outputs=[("out", "T")],
)

FUNCTIONS = (Sparsefinder, SparsefinderQuantization, nearest_clusters, quantile_bucket_keys, window_keys,
             predicted_attention)


def translate_sparsefinder(q, k, v, bias, mask, key_keep, w_q, w_k, centroids, scale, causal, bottom_right, cross,
                           normalizer, predictor, bucket_size, top_clusters, window, first_token):
    """custom_translation_table entry for torch.ops.attnpass.sparsefinder.default: an
    attnpass.Sparsefinder (clustering) or attnpass.SparsefinderQuantization node."""
    check_float("attnpass.Sparsefinder", q, k, v)
    if normalizer not in ("entmax15", "softmax"):
        raise ValueError(f"export_onnx: attnpass.Sparsefinder got normalizer {normalizer!r}; expected 'entmax15' "
                         "or 'softmax'")
    check_options({"predictor": predictor})
    inputs = (q, k, v, pair_bias(bias, q), pair_mask(mask), all_keys(q, k) if key_keep is None else key_keep,
              op.CastLike(w_q, q), op.CastLike(w_k, q))
    attributes = dict(scale=static_float("attnpass.Sparsefinder", "scale", scale), causal=int(bool(causal)),
                      bottom_right=int(bool(bottom_right)), entmax15=int(normalizer == "entmax15"),
                      window=int(window), first_token=int(bool(first_token)))
    if predictor == "quantization":
        return QUANTIZATION_NODE(*inputs, bucket_size=int(bucket_size), **attributes)
    return SPARSEFINDER_NODE(*inputs, op.CastLike(centroids, q), top_clusters=int(top_clusters), **attributes)
