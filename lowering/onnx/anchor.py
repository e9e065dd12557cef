"""ONNX lowering of the anchor's inference part (`attnpass::anchor_flash`: attention sinks and a local
window, `attnpass/methods/anchor.py`) as an ``attnpass.BlockAttention`` node with no chosen block.

BlockAttention (`blocks.py`) computes, under one softmax, a query's chosen key blocks, the `local`
keys after its limit i + offset and the sinks up to that limit, with key padding, and returns the
logsumexp. With the limit moved back by the window (offset = the site's offset - local) and every
chosen block empty (-1), that is exactly the anchor's part: the window (i + offset - local, i + offset]
and the sinks before it. The node's block (64 queries) only sets how its body groups queries.
"""
from __future__ import annotations

from onnxscript import opset18 as op

from attnpass.lowering.onnx.blocks import BLOCK_ATTENTION_NODE
from attnpass.lowering.onnx.common import all_keys, check_float, int_input, static_float

_QUERY_BLOCK = 64


def translate_anchor_flash(q, k, v, key_keep, scale, offset, local, sinks, band=0):
    """custom_translation_table entry for torch.ops.attnpass.anchor_flash.default."""
    name = "attnpass.BlockAttention (the anchor's sinks and window)"
    check_float(name, q, k, v)
    if band:
        raise NotImplementedError(f"export_onnx: {name}: a band site's anchor has no ONNX lowering in this version")
    if not isinstance(local, int) or local < 1:
        raise TypeError(f"export_onnx: {name} needs a static window of at least one key, got {local!r}")
    batch = op.Shape(q, start=0, end=1)
    block = op.Constant(value_ints=[_QUERY_BLOCK])
    query_blocks = op.Div(op.Add(op.Shape(q, start=2, end=3), op.Constant(value_ints=[_QUERY_BLOCK - 1])), block)
    no_block = op.Expand(op.Constant(value_int=-1), op.Concat(batch, op.Shape(k, start=1, end=2), query_blocks,
                                                              op.Constant(value_ints=[1]), axis=0))
    if sinks is None:  # one slot of -1, never seen
        sinks = op.Expand(op.Constant(value_int=-1), op.Concat(batch, op.Constant(value_ints=[1]), axis=0))
    return BLOCK_ATTENTION_NODE(
        q, k, v, no_block, all_keys(q, k) if key_keep is None else key_keep, sinks,
        op.Sub(int_input(offset), op.Constant(value_int=local)), scale=static_float(name, "scale", scale),
        block=_QUERY_BLOCK, causal=1, local=local)
