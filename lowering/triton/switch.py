"""When the sparse kernels take the Triton path: the force switch and the CUDA default.

Kept free of heavy imports (no triton, no kernels): the CPU kernels import it to decide, at the
top of each op implementation, whether to hand the call to `dispatch.py`.

* CUDA tensors use Triton automatically when triton is installed (``ATTNPASS_TRITON=0`` turns
  that off).
* ``ATTNPASS_TRITON=1`` or ``with force_triton():`` sends CPU tensors to the Triton kernels too,
  run by Triton's interpreter (``TRITON_INTERPRET=1``); for testing the kernels without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

__all__ = ["force_triton", "triton_available", "triton_call", "use_triton"]

_forced = 0  # process-wide (autograd may run the backward on another thread); nesting counter
_local = threading.local()


def triton_available() -> bool:
    """Is the ``triton`` package importable (without importing it)?"""
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def force_triton(enabled: bool = True):
    """Context manager: inside it the sparse kernels take the Triton path for every device.

    CPU tensors then need Triton's interpreter: set ``TRITON_INTERPRET=1`` in the environment
    before the first kernel runs. Wrap the backward pass too if its kernels should be Triton's.
    """
    global _forced
    delta = 1 if enabled else 0
    _forced += delta
    try:
        yield
    finally:
        _forced -= delta


@contextlib.contextmanager
def bypass():
    """Inside: never route to Triton (the dispatcher's fallback calls the PyTorch kernels)."""
    previous = getattr(_local, "bypass", False)
    _local.bypass = True
    try:
        yield
    finally:
        _local.bypass = previous


def use_triton(t) -> bool:
    """Should an op whose first input is `t` run the Triton kernels?"""
    if getattr(_local, "bypass", False):
        return False
    env = os.environ.get("ATTNPASS_TRITON", "")
    if _forced > 0 or env == "1":
        return True
    return env != "0" and t.device.type == "cuda" and triton_available()


def triton_call(entry: str, arguments: dict):
    """Run `dispatch.<entry>` with a PyTorch kernel implementation's own arguments (its locals())."""
    from attnpass.lowering.triton import dispatch  # imported on first use only

    return getattr(dispatch, entry)(**arguments)
