"""Sizes that stay symbolic while a layout is traced (torch.export, the compile backend).

A layout built as tensor code of the lengths traces once for every length, if the sizes it derives
never make the shape solver guess: comparisons it cannot decide become guards it may fail to
discharge, and an int read from a tensor must be an unbacked int with its bounds stated.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true


def tracing() -> bool:
    """Whether tensors are fake here (traced, not run): a value read from them decides nothing."""
    return torch._guards.detect_fake_mode() is not None


def smaller(a, b):
    """min(a, b) of sizes: what the shape environment knows, else a guard on the comparison (not
    builtins.min, which torch.export turns into a Min expression whose floor divisions later leave
    guards the shape solver cannot discharge)."""
    if statically_known_true(a <= b):
        return a
    if statically_known_true(b < a):
        return b
    return a if a <= b else b


def ceil_div(a, b):
    """ceil(a / b), one spelling everywhere, so the shape solver sees equal sizes as equal."""
    return (a + b - 1) // b


def read_size(t: Tensor, low, high):
    """A 0-dim int tensor as a size in [low, high]: eagerly its value; traced, an unbacked int with
    those bounds asserted, so the sizes built from it trace without guards (the compile backend lets
    its fake mode read it: `attnpass.backends.compile._scalar_outputs_allowed`)."""
    value = t.item()
    torch._check(value >= low)
    torch._check(value <= high)
    return value


def view_merged(x: Tensor, *shape) -> Tensor:
    """A contiguous `x` viewed as `shape`, which merges some of its dims, through one flat dim:
    merging symbolic dims in one view asks whether one divides another (a guard the shape solver
    cannot discharge), while flattening a contiguous tensor and splitting it are guard-free."""
    return x.reshape(-1).view(shape)
