"""ONNX lowering of the grouped kernel (`attnpass::grouped_attention`): node ``attnpass.GroupedAttention``.

A method whose layout code traces with symbolic lengths (Combiner) is exported as the standard ops
of that code around this kernel-level node: torch.export records the op, the translation table
writes the node, and its body is the kernel's semantics (lowering/torch/grouped_attention.py) in
standard ops.

Node: ``GroupedAttention(q, k, v, q_index, k_index, key_keep, summary_k, summary_v, summary_mask,
key_range, offset) -> (out, stat)`` with attributes ``scale`` (float), ``causal`` and ``window``
(int). Query slot (g, w) of batch row b and head h holds query i = q_index[b, h, g, w] (negative: an
empty slot); it sees its group's keys j = k_index[b, h, g, :] that are real (j >= 0, key_keep),
causal (j <= i + offset), in the band (window > 0: j > i + offset - window when causal,
|j - i - offset| < window otherwise) and in key_range [lo, hi]; and its group's summaries
(summary_k / summary_v) where summary_mask allows; one softmax over both. out (B, Hq, G, Wq, Dv); stat: the row's logsumexp; empty rows give 0 and 0. Largest
intermediate (B, Hq, G, Wq, Wk + S): the groups' own pairs, never Lq x Lk.

Absent optional inputs are neutral constants (common.py): no key padding all keys, no summaries one
zero summary that is never allowed, no key range [0, 2^62]. A call with a bias or a pair mask (read
at the pairs) is refused: its reads would cost index arithmetic over every pair of every call, and
the traced methods' sites that keep one (routing at an ALiBi site) are refused before the export
(`common.check_traced_site`).
"""
from __future__ import annotations

import onnx
from onnxscript import script
from onnxscript import opset18 as op

from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, int_input, node_op, static_float, true_scalar
from attnpass.lowering.onnx.dense import repeat_kv

_INT64 = onnx.TensorProto.INT64


@script(ATTNPASS, default_opset=op)
def gather_slots(x, index):
    """x (B, H, L, C), index (B, H, G, W) int64 >= 0 -> (B, H, G, W, C): x[b, h, index[b, h, g, w]]."""
    flat = op.Reshape(index, op.Concat(op.Shape(index, start=0, end=2), op.Constant(value_ints=[-1, 1]), axis=0))
    rows = op.GatherND(x, flat, batch_dims=2)                                     # (B, H, G * W, C)
    return op.Reshape(rows, op.Concat(op.Shape(index), op.Shape(x, start=3, end=4), axis=0))


@script(ATTNPASS, default_opset=op)
def GroupedAttention(q, k, v, q_index, k_index, key_keep, summary_k, summary_v, summary_mask, key_range, offset,
                     scale: float, causal: int, window: int):
    hq = op.Shape(q, start=1, end=2)
    zero = op.Constant(value_ints=[0])
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    i = op.Max(q_index, zero)
    j = op.Max(k_index, zero)
    q_g = gather_slots(q, i)                                                       # (B, Hq, G, Wq, D)
    k_g = gather_slots(repeat_kv(k, hq), j)                                        # (B, Hq, G, Wk, D)
    v_g = gather_slots(repeat_kv(v, hq), j)                                        # (B, Hq, G, Wk, Dv)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    i5 = op.Unsqueeze(i, [4])                                                      # (B, Hq, G, Wq, 1)
    j5 = op.Unsqueeze(j, [3])                                                      # (B, Hq, G, 1, Wk)
    logits = op.Mul(op.MatMul(q_g, op.Transpose(k_g, perm=[0, 1, 2, 4, 3])), scale_t)   # (B, Hq, G, Wq, Wk)

    # key padding per key slot (B, Hq, G, Wk), not per pair
    flat_j = op.Reshape(j, op.Concat(op.Shape(j, start=0, end=1), op.Constant(value_ints=[-1]), axis=0))
    keep_j = op.Reshape(op.GatherElements(key_keep, flat_j, axis=1), op.Shape(j))
    key_ok = op.And(op.GreaterOrEqual(k_index, zero), keep_j)
    ok = op.And(op.Unsqueeze(op.GreaterOrEqual(q_index, zero), [4]), op.Unsqueeze(key_ok, [3]))
    rel = op.Sub(op.Sub(j5, i5), offset)                                           # j - (i + offset)
    causal_c = op.Equal(op.Constant(value_int=causal), one_i)
    ok = op.And(ok, op.Or(op.Not(causal_c), op.LessOrEqual(rel, zero)))
    w = op.Constant(value_int=window)
    near = op.And(op.Or(op.Not(causal_c), op.Greater(rel, op.Neg(w))), op.Or(causal_c, op.Less(op.Abs(rel), w)))
    ok = op.And(ok, op.Or(op.Equal(w, zero_i), near))
    low = op.Gather(key_range, zero_i, axis=-1)
    high = op.Gather(key_range, one_i, axis=-1)
    ok = op.And(ok, op.And(op.GreaterOrEqual(j5, op.Unsqueeze(low, [4])), op.LessOrEqual(j5, op.Unsqueeze(high, [4]))))

    s_logits = op.Mul(op.MatMul(q_g, op.Transpose(summary_k, perm=[0, 1, 2, 4, 3])), scale_t)   # (B, Hq, G, Wq, S)
    s_ok = op.And(summary_mask, op.Unsqueeze(op.GreaterOrEqual(q_index, zero), [4]))

    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero_f = op.CastLike(op.Constant(value_float=0.0), q)
    top = op.Max(op.ReduceMax(op.Where(ok, logits, neg_inf), [-1], keepdims=1),
                 op.ReduceMax(op.Where(s_ok, s_logits, neg_inf), [-1], keepdims=1))
    top = op.Where(op.IsInf(top), zero_f, top)
    e = op.Where(ok, op.Exp(op.Sub(logits, top)), zero_f)
    e_s = op.Where(s_ok, op.Exp(op.Sub(s_logits, top)), zero_f)
    total = op.Add(op.ReduceSum(e, [-1], keepdims=1), op.ReduceSum(e_s, [-1], keepdims=1))
    filled = op.Greater(total, zero_f)
    out = op.Div(op.Add(op.MatMul(e, v_g), op.MatMul(e_s, summary_v)),
                 op.Max(total, op.CastLike(op.Constant(value_float=1e-30), q)))
    stat = op.Where(filled, op.Add(top, op.Log(op.Max(total, op.CastLike(op.Constant(value_float=1e-30), q)))), zero_f)
    return out, op.Squeeze(stat, [-1])


GROUPED_NODE = node_op(
    "GroupedAttention",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("q_index", "I"), ("k_index", "I"), ("key_keep", "B"),
            ("summary_k", "T"), ("summary_v", "T"), ("summary_mask", "B"), ("key_range", "I"),
            ("offset", "I")],
    attributes=[("scale", "float"), ("causal", "int"), ("window", "int")],
    outputs=[("out", "T"), ("stat", "T")],
)

FUNCTIONS = (GroupedAttention, gather_slots)

_NO_KEY_RANGE = [0, 1 << 62]


def translate_grouped(q, k, v, q_index, k_index, key_padding_mask=None, bias=None, summary_k=None, summary_v=None,
                      summary_mask=None, pair_mask=None, key_range=None, *, scale, causal=False, causal_offset=0, window=0,
                      dropout_p=0.0, dropout_seed=None, normalizer="softmax"):
    """custom_translation_table entry for torch.ops.attnpass.grouped_attention.default."""
    name = "attnpass.GroupedAttention"
    check_float(name, q, k, v)
    if normalizer != "softmax":
        raise NotImplementedError(f"export_onnx: {name} lowers the softmax; normalizer {normalizer!r} has no ONNX "
                                  "body in this version")
    if dropout_p:
        raise NotImplementedError(f"export_onnx: {name} is exported for inference; got dropout_p={dropout_p}")
    if bias is not None or pair_mask is not None:
        raise NotImplementedError(f"export_onnx: {name} with a bias or pair mask read at the pairs has no ONNX "
                                  "lowering in this version (common.check_traced_site refuses such sites)")
    if not isinstance(window, int):
        raise TypeError(f"export_onnx: {name} needs a static window (an int), got {window!r}")
    if summary_k is None:  # one zero summary, never allowed
        head = op.Concat(op.Constant(value_ints=[1, 1, 1, 1]), op.Shape(q, start=3, end=4), axis=0)
        summary_k = op.Expand(op.CastLike(op.Constant(value_float=0.0), q), head)
        summary_v = op.Expand(op.CastLike(op.Constant(value_float=0.0), q),
                              op.Concat(op.Constant(value_ints=[1, 1, 1, 1]), op.Shape(v, start=3, end=4), axis=0))
        summary_mask = op.Not(op.Reshape(true_scalar(), op.Constant(value_ints=[1, 1, 1, 1, 1])))
    elif summary_mask is None:
        summary_mask = op.Reshape(true_scalar(), op.Constant(value_ints=[1, 1, 1, 1, 1]))
    if key_range is None:
        key_range = op.Constant(value=onnx.helper.make_tensor("all", _INT64, [1, 1, 1, 1, 2], _NO_KEY_RANGE))
    return GROUPED_NODE(q, k, v, q_index, k_index, all_keys(q, k) if key_padding_mask is None else key_padding_mask,
                        summary_k, summary_v, summary_mask, key_range,
                        int_input(causal_offset), scale=static_float(name, "scale", scale), causal=int(bool(causal)),
                        window=window)
