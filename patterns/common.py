"""Helpers shared by the pattern families: the skip signal and the reading of scalar constants."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from attnpass.frontend.graph_ops import scalar_value, view

aten = torch.ops.aten


class Skip(Exception):
    """Raised by a pattern when a softmax looks like attention but cannot be rewritten exactly.

    The message is the reason shown to the user; the site is left unchanged.
    """


class NotAttention(Exception):
    """Raised by a pattern when a softmax is not attention at all (no report entry)."""


PRODUCT_KINDS = ("matmul", "bmm", "einsum", "baddbmm")


def constant_scalar(x) -> float | None:
    """The value of a scalar operand: a Python number, or a node making a 0-dim constant tensor
    (a literal, or a constant the captured program lifted: `CONSTANT_VALUE` in its meta)."""
    value = scalar_value(x)
    if value is not None:
        return value
    if isinstance(x, fx.Node) and CONSTANT_VALUE in x.meta:
        return x.meta[CONSTANT_VALUE]
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target in (aten.full.default, torch.full) and len(x.args) >= 2 and list(x.args[0]) == []:
            return scalar_value(x.args[1])
        if x.target in (aten.scalar_tensor.default, torch.scalar_tensor, torch.tensor, aten.lift_fresh_copy.default,
                        aten.detach.default, aten.detach_.default, aten.clone.default):
            if not x.args:
                return None
            return constant_scalar(x.args[0]) if isinstance(x.args[0], fx.Node) else scalar_value(x.args[0])
        ov = view(x)
        if ov is not None and ov.kind == "cast":
            return constant_scalar(ov["x"])
    return None


# meta key of a captured program's lifted one-element constant tensor (SEW-D's
# `torch.tensor(finfo.min)`): its value, set by attnpass.frontend.detect before the patterns run
CONSTANT_VALUE = "attnpass_constant_value"


def is_masking_value(x) -> bool:
    """-inf, finfo.min, -1e4 and below: the values models put where a pair must not count."""
    value = constant_scalar(x)
    return value is not None and ((math.isinf(value) and value < 0) or value <= -1e4)


def peel_scale(node, scale: float, where: str, notes: list[str]):
    """Walk up multiplications/divisions of `node` by a scalar (scale folded into q or k).

    Returns the unscaled node and the scale with the folded factors multiplied in.
    """
    folded = False
    while True:
        ov = view(node)
        if ov is None or ov.kind not in ("mul", "div"):
            break
        x, y = ov["x"], ov["y"]
        c = constant_scalar(y) if isinstance(x, fx.Node) else None
        if c is None and ov.kind == "mul" and isinstance(y, fx.Node):
            c, x = constant_scalar(x), y
        if c is None or not isinstance(x, fx.Node) or c == 0:
            break
        scale *= c if ov.kind == "mul" else 1.0 / c
        node, folded = x, True
    if folded:
        notes.append(f"folded into {where}")
    ov = view(node)
    if ov is not None and ov.kind in ("mul", "div") and any(_one_value_tensor(t) for t in (ov["x"], ov["y"])):
        # a scale computed as a tensor at run time (DeBERTa-v2's sqrt(d * factor)): it stays in the
        # graph, applied to the site's input, so the site's own scale does not include it
        notes.append(f"a run-time tensor scale on {where}, applied before the site")
    return node, scale


def _one_value_tensor(x) -> bool:
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.numel() == 1


def normalise_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim
