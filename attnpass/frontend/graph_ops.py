"""One vocabulary for the ops attention is spelled with, whatever the IR level.

A `torch.export` graph spells attention in ATen overloads (`aten.matmul.default`,
`aten.softmax.int`), a dynamo graph in Python callables (`torch.matmul`, `operator.truediv`,
`F.softmax`, the method `"transpose"`). Patterns should not be written twice, so every node is
first read through `view(node)`, which answers an `OpView`: a kind from a small fixed set plus
the operands under fixed names. Patterns only ever look at OpViews.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


@dataclass
class OpView:
    """A node seen as `kind(args...)` with operands under fixed names (see `_READERS`)."""

    kind: str
    node: fx.Node
    a: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key):
        return self.a[key]


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dim_list(dims):
    if isinstance(dims, (int, fx.Node)):  # dynamo: x.view(size) with the size as one traced value
        return [dims]
    return list(dims)


# --- readers: node -> dict of named operands, one per spelling ---------------------------------

def _binary(node):
    return {"x": _arg(node, 0, "input", _arg(node, 0, "self")), "y": _arg(node, 1, "other")}


def _read_softmax(node):
    dim = _arg(node, 1, "dim")
    dtype = node.kwargs.get("dtype", None)
    if node.target is aten._softmax.default:  # (self, dim, half_to_float)
        dtype = torch.float32 if node.args[2] else None
    return {"x": node.args[0], "dim": dim, "dtype": dtype}


def _read_dropout(node):
    return {"x": node.args[0], "p": _arg(node, 1, "p", 0.5), "train": _arg(node, 2, "train", _arg(node, 2, "training", True))}


def _read_transpose(node):
    return {"x": node.args[0], "dims": (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))}


def _read_permute(node):
    dims = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else _arg(node, 1, "dims")
    return {"x": node.args[0], "dims": tuple(_dim_list(dims))}


def _read_sdpa(node):
    return {
        "q": _arg(node, 0, "query"), "k": _arg(node, 1, "key"), "v": _arg(node, 2, "value"),
        "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
        "is_causal": _arg(node, 5, "is_causal", False), "scale": node.kwargs.get("scale", _arg(node, 6, "scale")),
        "enable_gqa": node.kwargs.get("enable_gqa", _arg(node, 7, "enable_gqa", False)),
    }


def _read_einsum(node):
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return {"equation": equation.replace(" ", ""), "operands": list(operands)}


def _read_baddbmm(node):
    # dynamo keeps the model's spelling: baddbmm(bias, batch1=q, batch2=k, beta=..., alpha=...)
    return {"bias": _arg(node, 0, "input"), "x": _arg(node, 1, "batch1"), "y": _arg(node, 2, "batch2"),
            "beta": _arg(node, 3, "beta", 1), "alpha": _arg(node, 4, "alpha", 1)}


def _read_masked_fill(node):
    return {"x": node.args[0], "mask": _arg(node, 1, "mask"), "value": _arg(node, 2, "value")}


def _read_where(node):
    return {"cond": _arg(node, 0, "condition"), "x": _arg(node, 1, "input", _arg(node, 1, "self")),
            "y": _arg(node, 2, "other")}


def _read_cast(node):
    return {"x": node.args[0]}


def _read_expand(node):
    sizes = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else node.args[1]
    return {"x": node.args[0], "sizes": list(_dim_list(sizes))}


def _read_reshape(node):
    sizes = node.args[1:] if node.op == "call_method" and len(node.args) > 2 else node.args[1]
    return {"x": node.args[0], "sizes": list(_dim_list(sizes))}


def _read_unary(node):
    return {"x": node.args[0]}


def _read_repeat_interleave(node):
    return {"x": node.args[0], "repeats": _arg(node, 1, "repeats"), "dim": _arg(node, 2, "dim")}


def _read_unsqueeze(node):
    return {"x": node.args[0], "dim": _arg(node, 1, "dim")}


def _read_slice(node):
    return {"x": node.args[0], "dim": _arg(node, 1, "dim", 0), "start": _arg(node, 2, "start", None),
            "end": _arg(node, 3, "end", None), "step": _arg(node, 4, "step", 1)}


# kind -> reader, and every spelling of that kind (ATen overloads, torch functions, methods).
_SPELLINGS: dict[str, tuple[Any, list]] = {
    "matmul": (_binary, [aten.matmul.default, torch.matmul, operator.matmul, "matmul"]),
    "bmm": (_binary, [aten.bmm.default, torch.bmm, "bmm"]),
    "einsum": (_read_einsum, [aten.einsum.default, torch.einsum, torch.functional.einsum]),
    "baddbmm": (_read_baddbmm, [aten.baddbmm.default, torch.baddbmm, "baddbmm"]),
    "sdpa": (_read_sdpa, [aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention]),
    "softmax": (_read_softmax, [aten.softmax.int, aten._softmax.default, F.softmax, torch.softmax, "softmax"]),
    "mul": (_binary, [aten.mul.Tensor, aten.mul.Scalar, operator.mul, torch.mul, "mul"]),
    "div": (_binary, [aten.div.Tensor, aten.div.Scalar, operator.truediv, torch.div, "div"]),
    # in place too: LongT5 writes `scores += position_bias`, which export keeps as add_ (the walker
    # accepts it only where the scores are the operand written to, see softmax_chain._walk_back)
    "add": (_binary, [aten.add.Tensor, aten.add.Scalar, operator.add, torch.add, "add",
                      aten.add_.Tensor, operator.iadd, "add_"]),
    # in place too: SEW-D zeroes the masked probabilities with masked_fill_ after the softmax
    "masked_fill": (_read_masked_fill, [aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill, "masked_fill",
                                        aten.masked_fill_.Scalar, aten.masked_fill_.Tensor, "masked_fill_"]),
    "where": (_read_where, [aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, torch.where]),
    "cast": (_read_cast, [aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                          aten.type_as.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
                          "to", "type", "float", "double", "type_as", "contiguous", "half", "bfloat16", "clone"]),
    "dropout": (_read_dropout, [aten.dropout.default, aten.native_dropout.default, F.dropout, torch.dropout, "dropout"]),
    "transpose": (_read_transpose, [aten.transpose.int, torch.transpose, "transpose"]),
    "t": (_read_unary, [aten.t.default, "t"]),
    "permute": (_read_permute, [aten.permute.default, torch.permute, "permute"]),
    "expand": (_read_expand, [aten.expand.default, "expand"]),
    "reshape": (_read_reshape, [aten.reshape.default, aten.view.default, aten._unsafe_view.default,
                                torch.reshape, "reshape", "view"]),
    "unsqueeze": (_read_unsqueeze, [aten.unsqueeze.default, torch.unsqueeze, "unsqueeze"]),
    "slice": (_read_slice, [aten.slice.Tensor]),
    "repeat_interleave": (_read_repeat_interleave, [aten.repeat_interleave.self_int, torch.repeat_interleave, "repeat_interleave"]),
}

_BY_TARGET: dict[Any, tuple[str, Any]] = {}
for _kind, (_reader, _targets) in _SPELLINGS.items():
    for _t in _targets:
        _BY_TARGET[_t] = (_kind, _reader)


IN_PLACE = (aten.add_.Tensor, operator.iadd, "add_")


def view(node: Any) -> OpView | None:
    """Read `node` as an OpView, or None when it is not one of the ops attention is spelled with."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    try:
        entry = _BY_TARGET.get(node.target)
    except TypeError:  # unhashable target
        return None
    if entry is None:
        return None
    kind, reader = entry
    return OpView(kind, node, reader(node))


# --- facts about values -------------------------------------------------------------------------

def meta_val(node: Any):
    """The fake tensor (or symbolic scalar) recorded for `node` at capture time, if any."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def shape(node: Any) -> tuple | None:
    val = meta_val(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def dtype(node: Any):
    val = meta_val(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def scalar_value(x: Any) -> float | None:
    """A Python number for a scalar operand (a literal, or a node holding a 0-dim constant-like value)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def same_size(a, b) -> bool:
    """Equality of two (possibly symbolic) sizes, decided on their expressions so that no guard
    is added to the captured program's shape environment."""
    return str(a) == str(b)
