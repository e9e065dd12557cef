"""ONNX lowering of routing's block-local heads (option ``local_heads``), still one node per site.

A routing site with ``local_heads = n > 0`` computes its first n query heads by block-local
attention (`methods/routing.py::_block_local_layout`: blocks of ``local_window`` queries see their
own and the previous key block, and the next one when not causal) and the rest by routing. Its
node is

- ``attnpass.RoutingWithLocalHeads(q, k, v, bias, mask, key_keep, query_keep, centroids)`` with
  the Routing attributes plus ``local_heads``: the body splits the heads (kv heads by the GQA
  group), runs `BlockLocal` on the first n and the `Routing` body on the rest (attributes
  forwarded), and concatenates them; or
- ``attnpass.BlockLocal(q, k, v, bias, mask, key_keep)`` (attributes scale, causal, bottom_right,
  window) when every head is local (the site then has no centroids).

BlockLocal body: the block layout from the run-time lengths (anchors in key space as
`base.key_anchor`: i + offset when causal, floor(i Lk / Lq) otherwise; width 2W causal, else the
widest block's span + 2W + 1), q / k / v rows gathered per block ((B, H, G, W, D) and
(B, H, G, Wk, D)), dense attention inside each block with the causal rule, key padding, bias and
mask read at the pairs, masked softmax; the largest intermediate is (B, H, G, W, Wk) = O(L W).
"""
from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript import opset18 as op

from attnpass.lowering.onnx.candidates import causal_rule
from attnpass.lowering.onnx.common import ATTNPASS, node_op
from attnpass.lowering.onnx.dense import masked_softmax, repeat_kv
from attnpass.lowering.onnx.routing import Routing, key_anchor, pair_values

_INT64 = onnx.TensorProto.INT64


@script(ATTNPASS, default_opset=op)
def BlockLocal(q, k, v, bias, mask, key_keep, scale: float, causal: int, bottom_right: int, window: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    v4 = repeat_kv(v, hq)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    lq = op.Shape(q, start=2, end=3)
    lk = op.Shape(k, start=2, end=3)
    offset, not_causal = causal_rule(q, k, op.Constant(value_int=causal), op.Constant(value_int=bottom_right))
    w = op.Unsqueeze(op.Constant(value_int=window), [0])                          # (1,)

    # --- the layout: G blocks of W query slots and their Wk key slots (-1 / out of range: none)
    blocks = op.Div(op.Sub(op.Add(lq, w), one), w)
    q_pos = op.Reshape(op.Range(zero_i, op.Squeeze(op.Mul(blocks, w), [0]), one_i), op.Concat(blocks, w, axis=0))
    first_q = op.Mul(op.Range(zero_i, op.Squeeze(blocks, [0]), one_i), w)         # (G,)
    last_q = op.Min(op.Sub(op.Add(first_q, w), one), op.Sub(lq, one))
    first = key_anchor(first_q, lq, lk, offset, not_causal)
    last = key_anchor(last_q, lq, lk, offset, not_causal)
    two_w = op.Add(w, w)
    start = op.Where(not_causal, op.Sub(first, w), op.Add(op.Sub(last, two_w), one))
    span = op.Add(op.Add(op.Reshape(op.ReduceMax(op.Sub(last, first), keepdims=0), one), two_w), one)
    width = op.Where(not_causal, span, two_w)
    k_pos = op.Add(op.Unsqueeze(start, [1]), op.Range(zero_i, op.Squeeze(width, [0]), one_i))  # (G, Wk)
    q_ok = op.Less(q_pos, lq)
    k_ok = op.And(op.GreaterOrEqual(k_pos, zero), op.Less(k_pos, lk))
    qi = op.Min(q_pos, op.Sub(lq, one))
    ki = op.Min(op.Max(k_pos, zero), op.Sub(lk, one))

    # --- dense attention inside each block
    q_g = op.Gather(q, qi, axis=2)                                                # (B, H, G, W, D)
    k_g = op.Gather(k4, ki, axis=2)                                               # (B, H, G, Wk, D)
    v_g = op.Gather(v4, ki, axis=2)
    b5 = op.Reshape(op.Range(zero_i, op.Squeeze(op.Shape(q, start=0, end=1), [0]), one_i),
                    op.Constant(value_ints=[-1, 1, 1, 1, 1]))
    h5 = op.Reshape(op.Range(zero_i, op.Squeeze(hq, [0]), one_i), op.Constant(value_ints=[1, -1, 1, 1, 1]))
    i5 = op.Unsqueeze(qi, [0, 1, 4])                                              # (1, 1, G, W, 1)
    j5 = op.Unsqueeze(ki, [0, 1, 3])                                              # (1, 1, G, 1, Wk)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    logits = op.Add(op.Mul(op.MatMul(q_g, op.Transpose(k_g, perm=[0, 1, 2, 4, 3])), scale_t),
                    pair_values(bias, b5, h5, i5, j5))                            # (B, H, G, W, Wk)
    allowed = op.And(op.Unsqueeze(q_ok, [2]), op.Unsqueeze(k_ok, [1]))            # (G, W, Wk)
    allowed = op.And(allowed, op.Or(not_causal, op.LessOrEqual(op.Unsqueeze(k_pos, [1]),
                                                                op.Add(op.Unsqueeze(q_pos, [2]), offset))))
    allowed = op.And(allowed, pair_values(op.Unsqueeze(key_keep, [1, 2]), b5, h5, i5, j5))
    allowed = op.And(allowed, pair_values(mask, b5, h5, i5, j5))
    out = op.MatMul(masked_softmax(logits, allowed), v_g)                         # (B, H, G, W, Dv)
    out = op.Reshape(out, op.Concat(op.Shape(out, start=0, end=2), op.Constant(value_ints=[-1]),
                                    op.Shape(out, start=4, end=5), axis=0))
    return op.Slice(out, zero, lq, op.Constant(value_ints=[2]))                   # (B, H, Lq, Dv)


@script(ATTNPASS, default_opset=op)
def head_range(t, start, stop):
    """Heads [start, stop) of a 4-D tensor broadcastable to (B, H, Lq, Lk); a broadcast head axis
    (size 1) is read at index 0 for each of them."""
    last = op.Sub(op.Shape(t, start=1, end=2), op.Constant(value_ints=[1]))
    return op.Gather(t, op.Min(op.Range(op.Squeeze(start, [0]), op.Squeeze(stop, [0]), op.Constant(value_int=1)),
                               last), axis=1)


@script(ATTNPASS, default_opset=op)
def RoutingWithLocalHeads(q, k, v, bias, mask, key_keep, query_keep, centroids, scale: float, causal: int,
                          bottom_right: int, local_window: int, local_heads: int):
    zero = op.Constant(value_ints=[0])
    axis1 = op.Constant(value_ints=[1])
    hq = op.Shape(q, start=1, end=2)
    hkv = op.Shape(k, start=1, end=2)
    n = op.Unsqueeze(op.Constant(value_int=local_heads), [0])
    n_kv = op.Div(n, op.Div(hq, hkv))                                             # GQA: whole kv groups
    local = BlockLocal(op.Slice(q, zero, n, axis1), op.Slice(k, zero, n_kv, axis1), op.Slice(v, zero, n_kv, axis1),
                       head_range(bias, zero, n), head_range(mask, zero, n), key_keep,
                       scale=scale, causal=causal, bottom_right=bottom_right, window=local_window)
    routed = Routing(op.Slice(q, n, hq, axis1), op.Slice(k, n_kv, hkv, axis1), op.Slice(v, n_kv, hkv, axis1),
                     head_range(bias, n, hq), head_range(mask, n, hq), key_keep, query_keep, centroids,
                     scale=scale, causal=causal, bottom_right=bottom_right, local_window=local_window)
    return op.Concat(local, routed, axis=1)


BLOCK_LOCAL_NODE = node_op(
    "BlockLocal",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("window", "int")],
    outputs=[("out", "T")],
)

ROUTING_LOCAL_NODE = node_op(
    "RoutingWithLocalHeads",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("query_keep", "B"), ("centroids", "T")],
    attributes=[("scale", "float"), ("causal", "int"), ("bottom_right", "int"), ("local_window", "int"),
                ("local_heads", "int")],
    outputs=[("out", "T")],
)

FUNCTIONS = (BlockLocal, RoutingWithLocalHeads, head_range)
