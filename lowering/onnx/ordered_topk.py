"""Standard-ONNX lowerings of the orderings routing's traced code uses, both ONNX TopK, whose ties go
to the lowest index:

- `attnpass::topk_lowest_index` (`lowering/torch/ordered_topk.py`): TopK (largest), its int64 indices;
  the lowest index among ties is the op's contract;
- ``aten.sort.stable`` (a stable sort, which the exporter has no function for): TopK over the whole
  axis, largest for descending; equal values keep their index order, which is what stable means.
"""
from __future__ import annotations

import onnx
from onnxscript import ir
from onnxscript import opset18 as op

from attnpass.lowering.onnx.common import int_input

# the element types onnxruntime's TopK takes; others (bool, int8, ...) are sorted as int32
_TOPK_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT32, ir.DataType.INT64)


def translate_topk_lowest_index(x, k, dim):
    """custom_translation_table entry for torch.ops.attnpass.topk_lowest_index.default."""
    _, indices = op.TopK(x, op.Reshape(int_input(k), op.Constant(value_ints=[1])), axis=dim, largest=1, sorted=1)
    return indices


def translate_stable_sort(x, stable=None, dim=-1, descending=False):
    """custom_translation_table entry for torch.ops.aten.sort.stable: (values, indices)."""
    keys = x if x.dtype in _TOPK_TYPES else op.Cast(x, to=onnx.TensorProto.INT32)
    length = op.Gather(op.Shape(x), op.Constant(value_ints=[dim]))
    values, indices = op.TopK(keys, length, axis=dim, largest=int(bool(descending)), sorted=1)
    return (values if keys is x else op.CastLike(values, x)), indices
