"""ONNX lowering of a Combiner site (variant "fixed"): node ``attnpass.Combiner``, one per site.

Node: ``Combiner(q, k, v, key_keep) -> out`` with attributes ``scale`` (float), ``causal`` (int
0/1) and ``block`` (int; 0 = the method's default, round(sqrt(L)) clamped to [1, L], computed from
the run-time length as `cost_model.default_block` does). Self-attention only (Lq == Lk = L; the
export checks it). Shapes: q (B, Hq, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), key_keep bool
(B, L) (all True when the site has no padding), out (B, Hq, L, Dv).

Semantics = `methods/combiner/` with `combiner.layout.build_layout("fixed", ...)`: keys are cut
into G = ceil(L / block) blocks; query i attends directly to the real keys of its own block
(causal: j <= i) and to one summary per other block (causal: per earlier block) that has a real
key, all under one softmax. Summary key = max-pool of the block's real keys; summary value =
softmax attention of the block's max-pooled real queries over its real keys (zero query when it
has none). A query with no allowed key gets zeros.

Body: pad L to G * block, reshape to (B, Hq, G, block, D); direct logits (B, Hq, G, block,
block), summary logits (B, Hq, G, block, G), one joint masked softmax. With block ~ sqrt(L) the
largest intermediate is O(L * sqrt(L)) per head and nothing has two axes of length L.

The PyTorch side is the custom op ``attnpass::combiner`` (eager: exactly the site module's
computation), which `bind` makes the site call during export so torch.export records one opaque
node instead of tracing the layout code (which needs concrete lengths).
"""
from __future__ import annotations

import functools
from typing import Optional

import onnx
import torch
from onnxscript import script
from onnxscript import opset18 as op
from torch import Tensor

from attnpass.lowering.onnx.common import ATTNPASS, all_keys, check_float, node_op, static_float
from attnpass.lowering.onnx.dense import masked_softmax, repeat_kv

_DOUBLE, _INT64, _FLOAT, _BOOL = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
EXPORTABLE_VARIANTS = ("fixed",)


# --------------------------------------------------------------------------------------------
# PyTorch side: one opaque op per site
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnpass::combiner", mutates_args=())
def combiner(q: Tensor, k: Tensor, v: Tensor, key_keep: Optional[Tensor], scale: float, causal: bool, block: int,
             variant: str) -> Tensor:
    """A Combiner site's attention (block 0 = the default per call), exactly as the site module computes it."""
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.combiner import CombinerAttention

    site = CombinerAttention(SiteSpec(name="attnpass::combiner", scale=scale, causal=causal),
                             variant=variant, block=block or None).eval()
    return site(q, k, v, key_keep=key_keep)


@combiner.register_fake
def _(q, k, v, key_keep, scale, causal, block, variant):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def check_options(options: dict) -> None:
    variant = options.get("variant", "fixed")
    if variant not in EXPORTABLE_VARIANTS:
        raise NotImplementedError(f"export_onnx: combiner variant {variant!r} cannot be exported to ONNX in this "
                                  f"version (only {list(EXPORTABLE_VARIANTS)}); its summaries (axial column "
                                  "cummax, logsparse dyadic levels) have no ONNX body yet")


def bind(module) -> None:
    """Make a Combiner site module (of a private copy) call `attnpass::combiner` when exported."""
    check_options({"variant": module.variant})
    if module.spec.cross:
        raise NotImplementedError(f"export_onnx: combiner site {module.spec.name!r} is cross-attention; the ONNX "
                                  "Combiner body covers self-attention (Lq == Lk) only")
    module.forward = functools.partial(_export_forward, module)


def _export_forward(module, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                    empty_rows: str = "zero"):
    if bias is not None or mask is not None:
        raise ValueError(f"combiner site {module.spec.name!r} got a bias or mask tensor, which region summaries "
                         "cannot carry")
    torch._check(q.shape[2] == k.shape[2],
                 lambda: f"export_onnx: combiner site {module.spec.name!r} needs Lq == Lk (self-attention)")
    return torch.ops.attnpass.combiner(q, k, v, key_keep, float(module.scale(q)), bool(module.spec.causal),
                                       int(module.block or 0), module.variant)


# --------------------------------------------------------------------------------------------
# ONNX side: the node and its body
# --------------------------------------------------------------------------------------------


@script(ATTNPASS, default_opset=op)
def Combiner(q, k, v, key_keep, scale: float, causal: int, block: int):
    hq = op.Shape(q, start=1, end=2)
    k4 = repeat_kv(k, hq)
    v4 = repeat_kv(v, hq)
    one = op.Constant(value_ints=[1])
    length = op.Shape(k, start=2, end=3)

    # block: the attribute, or round(sqrt(L)) (float64: the same rounding as Python's), in [1, L]
    auto = op.Cast(op.Round(op.Sqrt(op.Cast(length, to=_DOUBLE))), to=_INT64)
    given = op.Unsqueeze(op.Constant(value_int=block), [0])
    blk = op.Min(op.Max(op.Where(op.Equal(given, op.Constant(value_ints=[0])), auto, given), one), length)
    groups = op.Div(op.Sub(op.Add(length, blk), one), blk)
    padded = op.Mul(groups, blk)
    pad = op.Sub(padded, length)

    batch = op.Shape(q, start=0, end=1)
    d = op.Shape(q, start=3, end=4)
    dv = op.Shape(v, start=3, end=4)
    pads4 = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad, op.Constant(value_ints=[0]), axis=0)
    qb = op.Reshape(op.Pad(q, pads4), op.Concat(batch, hq, groups, blk, d, axis=0))
    kb = op.Reshape(op.Pad(k4, pads4), op.Concat(batch, hq, groups, blk, d, axis=0))
    vb = op.Reshape(op.Pad(v4, pads4), op.Concat(batch, hq, groups, blk, dv, axis=0))

    keep = op.Pad(op.Cast(key_keep, to=_FLOAT), op.Concat(op.Constant(value_ints=[0, 0, 0]), pad, axis=0))
    keep_cols = op.Cast(op.Reshape(keep, op.Concat(batch, one, groups, one, blk, axis=0)), to=_BOOL)
    keep_rows = op.Cast(op.Reshape(keep, op.Concat(batch, one, groups, blk, one, axis=0)), to=_BOOL)
    has = op.Greater(op.ReduceMax(op.Reshape(keep, op.Concat(batch, groups, blk, axis=0)), [2], keepdims=0),
                     op.Constant(value_float=0.0))  # (B, G): block has a real key (and a real query)
    has4 = op.Reshape(has, op.Concat(batch, one, groups, one, axis=0))

    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    scale_t = op.CastLike(op.Constant(value_float=scale), q)

    # summaries per block: key = max-pool of real keys, value = pooled real query's attention
    sum_k = op.Where(has4, op.ReduceMax(op.Where(keep_rows, kb, neg_inf), [3], keepdims=0), zero)  # (B, Hq, G, D)
    pool_q = op.Where(has4, op.ReduceMax(op.Where(keep_rows, qb, neg_inf), [3], keepdims=0), zero)
    kb_t = op.Transpose(kb, perm=[0, 1, 2, 4, 3])
    region_logits = op.Mul(op.MatMul(op.Unsqueeze(pool_q, [3]), kb_t), scale_t)         # (B, Hq, G, 1, blk)
    sum_v = op.Squeeze(op.MatMul(masked_softmax(region_logits, keep_cols), vb), [3])    # (B, Hq, G, Dv)

    # direct part: own block, causal inside it
    zero_i = op.Constant(value_int=0)
    one_i = op.Constant(value_int=1)
    causal_c = op.Constant(value_int=causal)
    pos = op.Range(zero_i, op.Squeeze(blk, [0]), one_i)
    causal_ok = op.Or(op.Equal(causal_c, zero_i), op.LessOrEqual(pos, op.Unsqueeze(pos, [1])))
    direct_ok = op.And(keep_cols, causal_ok)                                             # (B, 1, G, blk, blk)
    direct = op.Where(direct_ok, op.Mul(op.MatMul(qb, kb_t), scale_t), neg_inf)

    # summary part: every other block (causal: every earlier block) that has a real key
    region = op.Range(zero_i, op.Squeeze(groups, [0]), one_i)
    own = op.Unsqueeze(region, [1])
    bidirectional = op.Equal(causal_c, zero_i)  # (no Where on bools: onnxruntime has no kernel for it)
    reads = op.Or(op.And(bidirectional, op.Not(op.Equal(region, own))),
                  op.And(op.Not(bidirectional), op.Less(region, own)))                 # (G, G)
    summary_ok = op.And(op.Reshape(reads, op.Concat(one, one, groups, one, groups, axis=0)),
                        op.Reshape(has, op.Concat(batch, one, one, one, groups, axis=0)))  # (B, 1, G, 1, G)
    sum_k_t = op.Unsqueeze(op.Transpose(sum_k, perm=[0, 1, 3, 2]), [2])                  # (B, Hq, 1, D, G)
    summary = op.Where(summary_ok, op.Mul(op.MatMul(qb, sum_k_t), scale_t), neg_inf)     # (B, Hq, G, blk, G)

    # one softmax over [direct; summaries]
    top = op.Max(op.ReduceMax(direct, [-1], keepdims=1), op.ReduceMax(summary, [-1], keepdims=1))
    top = op.Where(op.IsInf(top), zero, top)
    e_direct = op.Where(direct_ok, op.Exp(op.Sub(direct, top)), zero)
    e_summary = op.Where(summary_ok, op.Exp(op.Sub(summary, top)), zero)
    total = op.Add(op.ReduceSum(e_direct, [-1], keepdims=1), op.ReduceSum(e_summary, [-1], keepdims=1))
    total = op.Max(total, op.CastLike(op.Constant(value_float=1e-30), q))
    out = op.Div(op.Add(op.MatMul(e_direct, vb), op.MatMul(e_summary, op.Unsqueeze(sum_v, [2]))), total)
    out = op.Reshape(out, op.Concat(batch, hq, padded, dv, axis=0))
    return op.Slice(out, op.Constant(value_ints=[0]), length, op.Constant(value_ints=[2]))


COMBINER_NODE = node_op(
    "Combiner",
    inputs=[("q", "T"), ("k", "T"), ("v", "T"), ("key_keep", "B")],
    attributes=[("scale", "float"), ("causal", "int"), ("block", "int")],
    outputs=[("out", "T")],
)

FUNCTIONS = (Combiner,)


def translate_combiner(q, k, v, key_keep, scale, causal, block, variant):
    """custom_translation_table entry for torch.ops.attnpass.combiner.default."""
    check_float("attnpass.Combiner", q, k, v)
    check_options({"variant": variant})
    if not isinstance(block, int) or block < 0:
        raise TypeError(f"export_onnx: attnpass.Combiner needs a static block (int >= 0), got {block!r}")
    return COMBINER_NODE(q, k, v, all_keys(q, k) if key_keep is None else key_keep,
                         scale=static_float("attnpass.Combiner", "scale", scale), causal=int(bool(causal)), block=block)
