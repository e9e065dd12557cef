"""ONNX lowering of `attnpass::attention` (the canonical dense op): node ``attnpass.Attention``.

Node: ``Attention(q, k, v, bias, mask, key_keep, causal_offset) -> out`` with attributes
``scale`` (float), ``causal`` (int 0/1) and ``empty_mean`` (int 0/1: the op's empty_rows rule). Shapes as the op (lowering/torch/dense.py): q (B, Hq,
Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), GQA query head h reads kv head h // (Hq // Hkv);
bias broadcastable to (B, Hq, Lq, Lk) (0.0 when the site has none); mask bool broadcastable the
same way (True when none); key_keep bool (B, Lk) (all True when none); causal_offset an int64
scalar input, because it is Lk - Lq for a bottom-right causal site and so symbolic under dynamic
shapes. Pair (i, j) is allowed if mask, key_keep[j] and (not causal or j <= i + causal_offset);
a query with no allowed key gets zeros (empty_mean=0) or the mean of v over all Lk keys of its kv
head (empty_mean=1), as the PyTorch op's empty_rows "zero" / "mean". The op's sdpa_in_input_dtype
does not matter here: the body computes in float32/float64 only.

The body builds the (B, Hq, Lq, Lk) scores: this is the dense method, quadratic by definition.
Inference only: dropout is not exported (export_onnx exports the eval graph).
"""
from __future__ import annotations

from onnxscript import script
from onnxscript import opset18 as op

from attnpass.lowering.onnx.common import (
    ATTNPASS, all_keys, check_float, int_input, node_op, static_float, true_scalar, zero_like,
)


# A band site (a sliding window) passes its band as the op's mask: the node exports it as it is
TAKES_BAND = True


def bind(module) -> None:
    """Nothing to bind: the dense site module already calls `attnpass::attention`, this node."""


@script(ATTNPASS, default_opset=op)
def repeat_kv(x, hq):
    """(B, Hkv, L, D) -> (B, Hq, L, D): kv head g serves query heads g*r .. g*r + r - 1 (GQA)."""
    hkv = op.Shape(x, start=1, end=2)
    rep = op.Div(hq, hkv)
    front = op.Shape(x, start=0, end=2)
    back = op.Shape(x, start=2, end=4)
    expanded = op.Expand(op.Unsqueeze(x, [2]), op.Concat(front, rep, back, axis=0))
    return op.Reshape(expanded, op.Concat(op.Shape(x, start=0, end=1), hq, back, axis=0))


@script(ATTNPASS, default_opset=op)
def masked_softmax(logits, allowed):
    """Softmax over the last axis restricted to `allowed`; rows with nothing allowed give zeros."""
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), logits)
    zero = op.CastLike(op.Constant(value_float=0.0), logits)
    masked = op.Where(allowed, logits, neg_inf)
    top = op.ReduceMax(masked, [-1], keepdims=1)
    top = op.Where(op.IsInf(top), zero, top)
    e = op.Where(allowed, op.Exp(op.Sub(masked, top)), zero)
    total = op.ReduceSum(e, [-1], keepdims=1)
    tiny = op.CastLike(op.Constant(value_float=1e-30), logits)
    return op.Div(e, op.Max(total, tiny))


@script(ATTNPASS, default_opset=op)
def Attention(q, k, v, bias, mask, key_keep, causal_offset, scale: float, causal: int, empty_mean: int = 0):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    v4 = repeat_kv(v, hq)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)
    scores = op.Add(op.Mul(op.MatMul(q, op.Transpose(k4, perm=[0, 1, 3, 2])), scale_t), bias)
    lq = op.Squeeze(op.Shape(q, start=2, end=3), [0])
    lk = op.Squeeze(op.Shape(k, start=2, end=3), [0])
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    i = op.Unsqueeze(op.Range(zero, lq, one), [1])
    j = op.Range(zero, lk, one)
    causal_ok = op.Or(op.Equal(op.Constant(value_int=causal), zero), op.LessOrEqual(j, op.Add(i, causal_offset)))
    allowed = op.And(op.And(mask, op.Unsqueeze(key_keep, [1, 2])), causal_ok)
    probs = masked_softmax(scores, allowed)
    # empty_mean: a row with no allowed key takes 1/Lk on every key (the mean of v), else zeros
    row_any = op.ReduceMax(op.CastLike(allowed, scores), [-1], keepdims=1)
    uniform = op.Reciprocal(op.CastLike(lk, scores))
    fill = op.Mul(op.Mul(op.Sub(op.CastLike(one, scores), row_any), uniform),
                  op.CastLike(op.Constant(value_int=empty_mean), scores))
    return op.MatMul(op.Add(probs, fill), v4)


ATTENTION_NODE = node_op(
    "Attention",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("bias", "T"), ("mask", "B"), ("key_keep", "B"),
            ("causal_offset", "I")],
    attributes=[("scale", "float"), ("causal", "int"), ("empty_mean", "int")],
    outputs=[("out", "T")],
)

# The model-local functions this node needs (its body calls the helpers as functions too).
FUNCTIONS = (Attention, repeat_kv, masked_softmax)


def translate_attention(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
                        empty_rows="zero", sdpa_in_input_dtype=True):
    """custom_translation_table entry for torch.ops.attnpass.attention.default.

    dropout_seed is irrelevant (dropout_p must be 0); sdpa_in_input_dtype too (float32/64 only)."""
    check_float("attnpass.Attention", q, k, v)
    if empty_rows not in ("zero", "mean"):
        raise ValueError(f"export_onnx: attnpass.Attention got empty_rows={empty_rows!r}, expected 'zero' or 'mean'")
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        raise ValueError(f"export_onnx: attnpass.Attention got dropout_p={dropout_p!r}; ONNX export is for "
                         "inference and exports the eval-mode graph (dropout off)")
    return ATTENTION_NODE(
        q, k, v,
        zero_like(q) if bias is None else op.CastLike(bias, q),
        true_scalar() if mask is None else mask,
        all_keys(q, k) if key_keep is None else key_keep,
        int_input(causal_offset),
        scale=static_float("attnpass.Attention", "scale", scale), causal=int(bool(causal)),
        empty_mean=int(empty_rows == "mean"),
    )
