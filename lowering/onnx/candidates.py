"""ONNX helpers for attention over per-query candidate key lists (Sparsefinder, SBM).

Both methods end the same way: each query has a padded list of candidate key positions (cluster
members plus a few extra keys), of which the causal rule and key padding allow some, with keys
possibly listed twice; the body keeps each allowed key once and normalises over them. Written once
here, called from the method bodies as model-local functions:

- `pair_values`: t[b, h, i, j] of a broadcastable bias / mask at index tensors (one flat Gather);
- `key_anchor`: a query position in key space (i + offset when causal, else floor(i Lk / Lq));
- `causal_rule`: the causal offset and flag from a node's attributes and the run-time lengths;
- `cluster_member_keys`: the keys of each query's chosen clusters, from a (B, H, c, Lk) 0/1 key
  membership, padded to the largest cluster (entries >= Lk mean "no key");
- `candidate_scores`: the set semantics (drop forbidden candidates, sort each row, drop a key
  equal to its predecessor), then the logits of the candidates with the bias and mask read at them,
  which the caller normalises (softmax, or `masked_entmax15`) and applies with
  `weighted_values`. Largest intermediates (B, H, Lq, W, D): W candidates per query, never Lq x Lk.
"""
from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript import opset18 as op

from attnpass.lowering.onnx.common import ATTNPASS

_INT64, _DOUBLE = onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE


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
def key_anchor(pos, lq, lk, offset, not_causal):
    """A query position in key space: i + offset (at most Lk - 1) when causal, else floor(i Lk / Lq)."""
    one = op.Constant(value_ints=[1])
    return op.Where(not_causal, op.Div(op.Mul(pos, lk), op.Max(lq, one)), op.Min(op.Add(pos, offset), op.Sub(lk, one)))


@script(ATTNPASS, default_opset=op)
def masked_entmax15(logits, allowed):
    """entmax-1.5 over the last axis restricted to `allowed` (rows with nothing allowed give zeros):
    p = relu(x / 2 - tau)^2 with the exact threshold of the CPU edge kernel (sorted row, float64
    cumulative sums, largest r with tau_r <= z_r)."""
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), logits)
    zero = op.CastLike(op.Constant(value_float=0.0), logits)
    x = op.Mul(op.Where(allowed, logits, neg_inf), op.CastLike(op.Constant(value_float=0.5), logits))
    top = op.ReduceMax(x, [-1], keepdims=1)
    finite_top = op.Not(op.Or(op.IsInf(top), op.IsNaN(top)))
    mx = op.Where(finite_top, top, zero)
    # entries below max - 1 are never in the support; clipping at max - 2 (as the kernel) parks -inf there
    z = op.Cast(op.Max(op.Sub(x, mx), op.CastLike(op.Constant(value_float=-2.0), x)), to=_DOUBLE)
    width = op.Shape(z, start=-1)
    zs, order = op.TopK(z, width, axis=-1, largest=1, sorted=1)
    rank = op.Cast(op.Range(op.Constant(value_int=1), op.Add(op.Squeeze(width, [0]), op.Constant(value_int=1)),
                            op.Constant(value_int=1)), to=_DOUBLE)
    s1 = op.CumSum(zs, op.Constant(value_int=-1))
    mean = op.Div(s1, rank)
    ss = op.Sub(op.CumSum(op.Mul(zs, zs), op.Constant(value_int=-1)), op.Mul(s1, mean))
    one_d = op.Constant(value=onnx.helper.make_tensor("one", _DOUBLE, [], [1.0]))
    zero_d = op.Constant(value=onnx.helper.make_tensor("zero", _DOUBLE, [], [0.0]))
    tau_r = op.Sub(mean, op.Sqrt(op.Max(op.Div(op.Sub(one_d, ss), rank), zero_d)))
    support = op.ReduceSum(op.Cast(op.LessOrEqual(tau_r, zs), to=_INT64), [-1], keepdims=1)
    support = op.Max(support, op.Constant(value_ints=[1]))
    tau = op.Add(op.GatherElements(tau_r, op.Sub(support, op.Constant(value_ints=[1])), axis=-1),
                 op.Cast(mx, to=_DOUBLE))
    any_finite = op.Greater(op.ReduceMax(op.Cast(op.Not(op.Or(op.IsInf(x), op.IsNaN(x))), to=_INT64), [-1],
                                         keepdims=1), op.Constant(value_ints=[0]))
    tau = op.CastLike(op.Where(any_finite, tau, zero_d), logits)
    s = op.Relu(op.Sub(x, tau))  # -inf (not allowed) -> 0
    return op.Mul(s, s)


@script(ATTNPASS, default_opset=op)
def causal_rule(q, k, causal, bottom_right):
    """causal, bottom_right: int64 scalars (the node's attributes) -> (offset (1,) int64: Lk - Lq for a
    bottom-right causal site, else 0; not_causal (1,) bool)."""
    zero = op.Constant(value_ints=[0])
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    offset = op.Where(op.Equal(op.Unsqueeze(bottom_right, [0]), zero), zero, op.Sub(lk, lq))
    return offset, op.Equal(op.Unsqueeze(causal, [0]), zero)


@script(ATTNPASS, default_opset=op)
def cluster_member_keys(member, q_clusters):
    """member (B, H, c, Lk) int64 0/1, q_clusters (B, H, Lq, t) int64 -> (B, H, Lq, t * M): the
    member keys of each query's t clusters by position, M = the largest cluster; Lk = no key."""
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    one = op.Constant(value_ints=[1])
    lk = op.Shape(member, start=3, end=4)
    largest = op.Max(op.Reshape(op.ReduceMax(op.ReduceSum(member, [3], keepdims=0), keepdims=0), [1]), one)
    positions = op.Range(zero_i, op.Squeeze(lk, [0]), one_i)                      # (Lk,)
    rank_key = op.Add(positions, op.Mul(op.Sub(one, member), lk))                # members first, by position
    listed, unused = op.TopK(rank_key, largest, axis=-1, largest=0, sorted=1)    # (B, H, c, M)
    cluster_keys = op.GatherND(listed, op.Unsqueeze(q_clusters, [4]), batch_dims=2)  # (B, H, Lq, t, M)
    shape = op.Concat(op.Shape(cluster_keys, start=0, end=3), op.Constant(value_ints=[-1]), axis=0)
    return op.Reshape(cluster_keys, shape)


@script(ATTNPASS, default_opset=op)
def candidate_scores(q, k4, v4, cand, bias, mask, key_keep, offset, not_causal, scale_t):
    """q (B, H, Lq, D), k4 / v4 (B, H, Lk, D / Dv) (kv heads already repeated), cand (B, H, Lq, W)
    int64 key positions (>= Lk: none), bias / mask 4-D broadcastable to (B, H, Lq, Lk), key_keep
    (B, Lk) bool, offset (1,) int64 causal offset, not_causal (1,) bool, scale_t scalar ->
    logits (B, H, Lq, W), allowed (B, H, Lq, W) bool (each allowed key once) and the candidates'
    values (B, H, Lq, W, Dv); the caller normalises and applies `weighted_values`.

    (The normaliser is the caller's: an ONNX If choosing it here would leave its output untyped
    for the checker's shape inference inside a function.)"""
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    lk = op.Shape(k4, start=2, end=3)
    b4 = op.Reshape(op.Range(zero_i, op.Squeeze(op.Shape(q, start=0, end=1), [0]), one_i),
                    op.Constant(value_ints=[-1, 1, 1, 1]))
    h4 = op.Reshape(op.Range(zero_i, op.Squeeze(op.Shape(q, start=1, end=2), [0]), one_i),
                    op.Constant(value_ints=[1, -1, 1, 1]))
    i4 = op.Reshape(op.Range(zero_i, op.Squeeze(op.Shape(q, start=2, end=3), [0]), one_i),
                    op.Constant(value_ints=[1, 1, -1, 1]))
    inside = op.Less(cand, lk)
    j_safe = op.Where(inside, cand, zero)
    ok = op.And(inside, op.Or(not_causal, op.LessOrEqual(cand, op.Add(i4, offset))))
    ok = op.And(ok, pair_values(op.Unsqueeze(key_keep, [1, 2]), b4, h4, i4, j_safe))
    cand = op.Where(ok, cand, lk)
    width = op.Shape(cand, start=3, end=4)
    ordered, unused = op.TopK(cand, width, axis=-1, largest=0, sorted=1)
    before = op.Concat(op.Expand(op.Constant(value_ints=[-1]), op.Concat(op.Shape(ordered, start=0, end=3), one, axis=0)),
                       op.Slice(ordered, zero, op.Sub(width, one), op.Constant(value_ints=[3])), axis=3)
    edge = op.And(op.Less(ordered, lk), op.Not(op.Equal(ordered, before)))       # (B, H, Lq, W)
    j = op.Where(edge, ordered, zero)

    k_g = op.GatherND(k4, op.Unsqueeze(j, [4]), batch_dims=2)                   # (B, H, Lq, W, D)
    v_g = op.GatherND(v4, op.Unsqueeze(j, [4]), batch_dims=2)                   # (B, H, Lq, W, Dv)
    dots = op.Squeeze(op.MatMul(op.Unsqueeze(q, [3]), op.Transpose(k_g, perm=[0, 1, 2, 4, 3])), [3])
    logits = op.Add(op.Mul(dots, scale_t), pair_values(bias, b4, h4, i4, j))    # (B, H, Lq, W)
    allowed = op.And(edge, pair_values(mask, b4, h4, i4, j))
    return logits, allowed, v_g


@script(ATTNPASS, default_opset=op)
def weighted_values(probs, v_g):
    """probs (B, H, Lq, W), v_g (B, H, Lq, W, Dv) -> (B, H, Lq, Dv)."""
    return op.Squeeze(op.MatMul(op.Unsqueeze(probs, [3]), v_g), [3])


FUNCTIONS = (pair_values, key_anchor, causal_rule, cluster_member_keys, candidate_scores, weighted_values, masked_entmax15)
