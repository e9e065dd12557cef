"""Record the largest tensor any aten op produces, to check that a sparse path never builds an L x L tensor."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """Dispatch mode that remembers the largest output (by numel) of every aten op run inside it."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.op = None
        self.shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # a sparse tensor's numel is its logical size; its storage (indices, values) is seen
            # as the outputs of the ops that built it
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), func, tuple(t.shape)
        return out


@contextlib.contextmanager
def no_square_tensor(lq: int, lk: int):
    """Fail if any op inside the block produces a tensor with at least lq * lk elements.

    Use shapes where lq * lk is far above every legitimate sparse intermediate (e.g. L=1024 with
    blocks of 32), so the check cannot pass by accident and cannot fail on honest work.
    """
    probe = LargestTensor()
    with probe:
        yield probe
    assert probe.numel < lq * lk, (
        f"{probe.op} produced a tensor of shape {probe.shape} ({probe.numel} elements) "
        f">= Lq*Lk = {lq * lk}: the sparse path built a quadratic tensor"
    )
