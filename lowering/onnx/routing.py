"""ONNX lowering of a routing site: node ``attnpass.Routing``, one per site (eval: trained centroids).

Node: ``Routing(q, k, v, bias, mask, key_keep, query_keep, centroids) -> out`` with attributes
``scale`` (float), ``causal`` (int), ``bottom_right`` (int: causal offset Lk - Lq, derived from
the shapes in the body, else 0) and ``local_window`` (int). q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
v (B, Hkv, Lk, Dv); bias (float) and mask (bool) 4-D, broadcastable to (B, Hq, Lq, Lk) (0.0 /
True when the site has none; read only at the computed pairs); key_keep (B, Lk) and query_keep
(B, Lq) bool (query_keep is key_keep for self-attention, all True otherwise); centroids (Hq, c, D),
the site's k-means centroids, stored in the file as an initializer.

Semantics = `methods/routing.py` in eval mode (no local heads): tokens are layer-normed (no
affine, eps 1e-5); each cluster takes its ceil(Lq/c) most similar queries (padding queries rank
last) and, separately, its ceil(Lk/c) most similar real keys, both sorted by position; a cluster
row is empty when the cluster has no real key, or (causal) its first key is after the query.
Attention is dense inside each cluster (causal by position, bias and mask read at the pairs), a
token's output is the mean over the clusters whose row it filled, and a query no cluster served
attends to its window of `local_window` real keys around its key-space anchor instead (causal: the
last ones at or before i + offset; otherwise centred on floor(i Lk / Lq), shifted to stay inside
the real keys). The centroids are not updated: inference.

Body: TopK for the cluster members (twice: select, then sort by position), GatherND of the
member rows, per-cluster MatMul (B, Hq, c, ceil(Lq/c), ceil(Lk/c)), ScatterND(add) for the mean;
the orphan queries are found with NonZero and attend to their windows as (N, 1, W) products. Bias
and mask are read with flat Gather indices (clamped on broadcast axes), so nothing of size Lq x Lk
is built. Exact ties in similarity (identical tokens, e.g. padding in the first layer of a model
without absolute positions such as T5) are broken by TopK's rule (lowest index), as PyTorch's
routing breaks them (attnpass.lowering.torch.ordered_topk; docs/onnx.md).
"""
from __future__ import annotations

import functools
from typing import Optional

import onnx
import torch
from onnxscript import script
from onnxscript import opset18 as op
from torch import Tensor

from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, node_op, pair_bias, pair_mask, static_float
from attnpass.lowering.onnx.dense import masked_softmax, repeat_kv

_INT64, _BOOL = onnx.TensorProto.INT64, onnx.TensorProto.BOOL


# --------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnpass::routing", mutates_args=())
def routing(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
            key_keep: Optional[Tensor], centroids: Optional[Tensor], scale: float, causal: bool, bottom_right: bool,
            cross: bool, local_window: int, local_heads: int) -> Tensor:
    """A routing site's eval-mode attention with these centroids (None: every head is local),
    exactly as the site module computes it."""
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.routing import RoutingAttention

    spec = SiteSpec(name="attnpass::routing", scale=scale, causal=causal, causal_bottom_right=bottom_right,
                    heads_q=q.shape[1], heads_kv=k.shape[1], head_dim=q.shape[3], cross=cross)
    clusters = 1 if centroids is None else centroids.shape[1]
    site = RoutingAttention(spec, clusters=clusters, local_window=local_window, local_heads=local_heads).eval()
    if centroids is not None:
        with torch.no_grad():
            site.kmeans.centroids.copy_(centroids)
            site.kmeans.initialized.fill_(True)
    return site(q, k, v, bias, mask, key_keep)


@routing.register_fake
def _(q, k, v, bias, mask, key_keep, centroids, scale, causal, bottom_right, cross, local_window, local_heads):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_VARIANT_NOT_LOWERED = ("export_onnx: routing with queries={queries!r}, keys={keys!r} has no ONNX lowering in this "
                        "version: the attnpass.Routing node implements the paper's routing (queries='balanced', "
                        "keys='centroids')")


def check_options(options: dict) -> None:
    queries, keys = options.get("queries", "balanced"), options.get("keys", "centroids")
    if (queries, keys) != ("balanced", "centroids"):
        raise NotImplementedError(_VARIANT_NOT_LOWERED.format(queries=queries, keys=keys))
    if options.get("refit_steps"):
        raise NotImplementedError(f"export_onnx: routing with refit_steps={options['refit_steps']} has no ONNX "
                                  "lowering in this version: the attnpass.Routing node routes by the stored centroids")


def bind(module) -> None:
    """Make a routing site module (of a private copy, in eval mode) call `attnpass::routing` when exported."""
    check_options({"queries": module.queries, "keys": module.keys, "refit_steps": module.refit_steps})
    if module.kmeans is not None and not bool(module.kmeans.initialized):
        raise ValueError(f"export_onnx: routing site {module.spec.name!r} has no centroids yet (they are "
                         "initialised by the first call); run or train the model before exporting it")
    module.forward = functools.partial(_export_forward, module)


def _export_forward(module, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                    empty_rows: str = "zero"):
    if not module.spec.cross:
        # key padding is query padding only when query i is key i
        torch._check(q.shape[2] == k.shape[2],
                     lambda: f"export_onnx: routing self-attention site {module.spec.name!r} needs Lq == Lk")
    return torch.ops.attnpass.routing(
        q, k, v, bias, mask, key_keep, None if module.kmeans is None else module.kmeans.centroids,
        float(module.scale(q)), bool(module.spec.causal), bool(module.spec.causal_bottom_right),
        bool(module.spec.cross), int(module.local_window), int(module.local_heads))


# --------------------------------------------------------------------------------------------
# ONNX side
# --------------------------------------------------------------------------------------------


@script(ATTNPASS, default_opset=op)
def layer_norm(x):
    """layer_norm over the last axis without affine parameters (eps 1e-5, torch's default)."""
    mean = op.ReduceMean(x, [-1], keepdims=1)
    centred = op.Sub(x, mean)
    var = op.ReduceMean(op.Mul(centred, centred), [-1], keepdims=1)
    return op.Div(centred, op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=1e-5), x))))


@script(ATTNPASS, default_opset=op)
def sorted_top(sim, width, keep, drop: int):
    """Positions of each row's `width` largest scores (keep False ranks last; with drop, such picks
    become -1), ascending, -1 last. sim (B, H, c, L), keep bool broadcastable to it."""
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), sim)
    masked = op.Where(keep, sim, neg_inf)
    values, chosen = op.TopK(masked, width, axis=-1, largest=1, sorted=0)
    length = op.Shape(sim, start=3, end=4)
    kept = op.GatherElements(op.Expand(keep, op.Shape(sim)), chosen, axis=-1)
    kept = op.Or(kept, op.Equal(op.Constant(value_int=drop), op.Constant(value_int=0)))
    chosen = op.Where(kept, chosen, length)  # L sorts after every real position
    ordered, order = op.TopK(chosen, width, axis=-1, largest=0, sorted=1)
    return op.Where(op.Equal(ordered, length), op.Constant(value_ints=[-1]), ordered)


@script(ATTNPASS, default_opset=op)
def key_anchor(pos, lq, lk, offset, not_causal):
    """A query position in key space: i + offset (at most Lk - 1) when causal, else floor(i Lk / Lq)."""
    one = op.Constant(value_ints=[1])
    return op.Where(not_causal, op.Div(op.Mul(pos, lk), op.Max(lq, one)), op.Min(op.Add(pos, offset), op.Sub(lk, one)))


@script(ATTNPASS, default_opset=op)
def pair_values(t, b, h, i, j):
    """t[b, h, i, j] for a 4-D t broadcastable to (B, H, Lq, Lk) and broadcasting int64 index
    tensors (>= 0); broadcast axes of t (size 1) read index 0. One flat Gather."""
    one = op.Constant(value_ints=[1])
    dims = op.Shape(t)
    d0 = op.Slice(dims, [0], [1])
    d1 = op.Slice(dims, [1], [2])
    d2 = op.Slice(dims, [2], [3])
    d3 = op.Slice(dims, [3], [4])
    flat = op.Add(op.Mul(op.Min(b, op.Sub(d0, one)), op.Mul(op.Mul(d1, d2), d3)),
                  op.Mul(op.Min(h, op.Sub(d1, one)), op.Mul(d2, d3)))
    flat = op.Add(op.Add(flat, op.Mul(op.Min(i, op.Sub(d2, one)), d3)), op.Min(j, op.Sub(d3, one)))
    return op.Gather(op.Reshape(t, op.Constant(value_ints=[-1])), flat, axis=0)


@script(ATTNPASS, default_opset=op)
def zero_like_float(x):
    return op.CastLike(op.Constant(value_float=0.0), x)


@script(ATTNPASS, default_opset=op)
def Routing(q, k, v, bias, mask, key_keep, query_keep, centroids, scale: float, causal: int, bottom_right: int,
            local_window: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    v4 = repeat_kv(v, hq)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    minus_one = op.Constant(value_ints=[-1])
    batch = op.Shape(q, start=0, end=1)
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    dv = op.Shape(v, start=3, end=4)
    offset = op.Where(op.Equal(op.Unsqueeze(op.Constant(value_int=bottom_right), [0]), zero), zero, op.Sub(lk, lq))
    not_causal = op.Equal(op.Unsqueeze(op.Constant(value_int=causal), [0]), zero)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)

    # --- cluster members: top ceil(L/c) queries and real keys per centroid, by position
    clusters = op.Shape(centroids, start=1, end=2)
    wq = op.Div(op.Sub(op.Add(lq, clusters), one), clusters)
    wk = op.Div(op.Sub(op.Add(lk, clusters), one), clusters)
    mu = op.CastLike(centroids, q)
    sim_q = op.MatMul(mu, op.Transpose(layer_norm(q), perm=[0, 1, 3, 2]))    # (B, H, c, Lq)
    sim_k = op.MatMul(mu, op.Transpose(layer_norm(k4), perm=[0, 1, 3, 2]))   # (B, H, c, Lk)
    routed_q = sorted_top(sim_q, wq, op.Unsqueeze(query_keep, [1, 2]), drop=0)
    k_index = sorted_top(sim_k, wk, op.Unsqueeze(key_keep, [1, 2]), drop=1)
    first_key = op.Slice(k_index, zero, one, op.Constant(value_ints=[3]))
    filled = op.And(op.GreaterOrEqual(routed_q, zero), op.GreaterOrEqual(first_key, zero))
    filled = op.And(filled, op.Or(not_causal, op.LessOrEqual(first_key, op.Add(routed_q, offset))))
    q_index = op.Where(filled, routed_q, minus_one)                           # (B, H, c, wq)

    # --- dense attention inside each cluster
    qi = op.Max(q_index, zero)
    ki = op.Max(k_index, zero)
    q_g = op.GatherND(q, op.Unsqueeze(qi, [4]), batch_dims=2)                 # (B, H, c, wq, D)
    k_g = op.GatherND(k4, op.Unsqueeze(ki, [4]), batch_dims=2)                # (B, H, c, wk, D)
    v_g = op.GatherND(v4, op.Unsqueeze(ki, [4]), batch_dims=2)
    b5 = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(batch, [0]), op.Constant(value_int=1)),
                    op.Constant(value_ints=[-1, 1, 1, 1, 1]))
    h5 = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(hq, [0]), op.Constant(value_int=1)),
                    op.Constant(value_ints=[1, -1, 1, 1, 1]))
    i5 = op.Unsqueeze(qi, [4])
    j5 = op.Unsqueeze(ki, [3])
    logits = op.Add(op.Mul(op.MatMul(q_g, op.Transpose(k_g, perm=[0, 1, 2, 4, 3])), scale_t),
                    pair_values(bias, b5, h5, i5, j5))                        # (B, H, c, wq, wk)
    allowed = op.And(op.GreaterOrEqual(op.Unsqueeze(q_index, [4]), zero), op.GreaterOrEqual(op.Unsqueeze(k_index, [3]), zero))
    allowed = op.And(allowed, op.Or(not_causal, op.LessOrEqual(j5, op.Add(i5, offset))))
    allowed = op.And(allowed, pair_values(mask, b5, h5, i5, j5))
    slots = op.MatMul(masked_softmax(logits, allowed), v_g)                   # (B, H, c, wq, Dv)

    # --- mean over the clusters a query filled a row in
    valid = op.GreaterOrEqual(q_index, zero)
    shape4 = op.Concat(batch, hq, op.Shape(qi, start=2, end=4), axis=0)
    where = op.Concat(op.Unsqueeze(op.Expand(op.Squeeze(b5, [4]), shape4), [4]),
                      op.Unsqueeze(op.Expand(op.Squeeze(h5, [4]), shape4), [4]), i5, axis=4)  # (B, H, c, wq, 3)
    weight = op.CastLike(valid, q)
    zeros_out = op.CastLike(op.ConstantOfShape(op.Concat(batch, hq, lq, dv, axis=0)), q)
    zeros_cnt = op.CastLike(op.ConstantOfShape(op.Concat(batch, hq, lq, axis=0)), q)
    total = op.ScatterND(zeros_out, where, op.Mul(slots, op.Unsqueeze(weight, [4])), reduction="add")
    count = op.ScatterND(zeros_cnt, where, weight, reduction="add")           # (B, H, Lq)
    out = op.Div(total, op.Unsqueeze(op.Max(count, op.CastLike(op.Constant(value_float=1.0), q)), [3]))

    # --- queries no cluster served: a window of real keys around their anchor
    orphans = op.Transpose(op.NonZero(op.Equal(count, zero_like_float(count))), perm=[1, 0])  # (N, 3)
    ob = op.Slice(orphans, zero, one, one)
    oh = op.Slice(orphans, one, op.Constant(value_ints=[2]), one)
    oi = op.Slice(orphans, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]), one)     # (N, 1)
    keep_i = op.Cast(key_keep, to=_INT64)
    real_up_to = op.CumSum(keep_i, op.Constant(value_int=1))                  # (B, Lk)
    num_real = op.ReduceSum(keep_i, [1], keepdims=1)                          # (B, 1)
    anchor = key_anchor(oi, lq, lk, offset, not_causal)
    seen = op.GatherND(real_up_to, op.Concat(ob, op.Max(anchor, zero), axis=1))
    seen = op.Where(op.Less(anchor, zero), zero, op.Unsqueeze(seen, [1]))     # real keys at or before the anchor
    width = op.Min(op.Unsqueeze(op.Constant(value_int=local_window), [0]), lk)
    real = op.GatherND(num_real, ob)                                          # (N, 1)
    centred = op.Max(op.Sub(op.Max(op.Sub(seen, one), zero), op.Div(width, op.Constant(value_ints=[2]))), zero)
    centred = op.Min(centred, op.Max(op.Sub(real, width), zero))
    first = op.Where(not_causal, centred, op.Sub(seen, width))
    limit = op.Where(not_causal, real, seen)
    last = op.Sub(op.Min(op.Add(first, width), limit), one)
    first = op.Max(first, zero)
    # key positions by rank: real keys first (in order), then padding
    positions = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(lk, [0]), op.Constant(value_int=1)), [0])
    rank = op.Where(op.Cast(keep_i, to=_BOOL), op.Sub(real_up_to, one), op.Sub(op.Add(num_real, positions), real_up_to))
    in_order = op.ScatterElements(op.Mul(keep_i, zero), rank, op.Expand(positions, op.Shape(keep_i)), axis=1)
    ranks = op.Add(first, op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(width, [0]), op.Constant(value_int=1)), [0]))
    in_window = op.LessOrEqual(ranks, last)                                   # (N, W)
    nw = op.Shape(ranks)
    rows = op.Unsqueeze(op.Expand(ob, nw), [2])
    key_pos = op.GatherND(in_order, op.Concat(rows, op.Unsqueeze(op.Min(ranks, op.Sub(lk, one)), [2]), axis=2))  # (N, W)
    head_rows = op.Unsqueeze(op.Expand(oh, nw), [2])
    kv_at = op.Concat(rows, head_rows, op.Unsqueeze(key_pos, [2]), axis=2)    # (N, W, 3)
    k_o = op.GatherND(k4, kv_at)                                              # (N, W, D)
    v_o = op.GatherND(v4, kv_at)
    q_o = op.Unsqueeze(op.GatherND(q, orphans), [1])                          # (N, 1, D)
    b3 = op.Unsqueeze(ob, [2])
    h3 = op.Unsqueeze(oh, [2])
    i3 = op.Unsqueeze(oi, [2])
    j3 = op.Unsqueeze(key_pos, [1])                                           # (N, 1, W)
    logits_o = op.Add(op.Mul(op.MatMul(q_o, op.Transpose(k_o, perm=[0, 2, 1])), scale_t), pair_values(bias, b3, h3, i3, j3))
    allowed_o = op.And(op.Unsqueeze(in_window, [1]), op.Or(not_causal, op.LessOrEqual(j3, op.Add(i3, offset))))
    allowed_o = op.And(allowed_o, pair_values(mask, b3, h3, i3, j3))
    window_out = op.Squeeze(op.MatMul(masked_softmax(logits_o, allowed_o), v_o), [1])  # (N, Dv)
    return op.ScatterND(out, orphans, window_out)


ROUTING_NODE = node_op(
    "Routing",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("query_keep", "B"), ("centroids", "T")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("local_window", "int")],
    outputs=[("out", "T")],
)

FUNCTIONS = (Routing, layer_norm, sorted_top, key_anchor, pair_values, zero_like_float)


def translate_routing(q, k, v, bias, mask, key_keep, centroids, scale, causal, bottom_right, cross, local_window,
                      local_heads):
    """custom_translation_table entry for torch.ops.attnpass.routing.default: an attnpass.Routing
    node, or with local heads attnpass.RoutingWithLocalHeads / attnpass.BlockLocal (all heads local)."""
    from attnpass.lowering.onnx.block_local import BLOCK_LOCAL_NODE, ROUTING_LOCAL_NODE

    check_float("attnpass.Routing", q, k, v)
    keep = all_keys(q, k) if key_keep is None else key_keep
    query_keep = keep if (key_keep is not None and not cross) else all_keys(q, q)
    attributes = dict(scale=static_float("attnpass.Routing", "scale", scale), causal=int(bool(causal)),
                      bottom_right=int(bool(bottom_right)))
    if centroids is None:
        return BLOCK_LOCAL_NODE(q, k, v, pair_bias(bias, q), pair_mask(mask), keep, window=int(local_window),
                                **attributes)
    inputs = (q, k, v, pair_bias(bias, q), pair_mask(mask), keep, query_keep, centroids)
    if local_heads:
        return ROUTING_LOCAL_NODE(*inputs, local_window=int(local_window), local_heads=int(local_heads), **attributes)
    return ROUTING_NODE(*inputs, local_window=int(local_window), **attributes)
