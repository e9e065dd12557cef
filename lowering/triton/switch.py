"""When the sparse kernels take the Triton path: the force switch and the CUDA default.

Kept free of heavy imports (no triton, no kernels): the PyTorch kernel modules register each op's
function through `dispatching`, the one place that picks the PyTorch kernels or `dispatch.py`;
neither implementation calls the other's private functions.

* CUDA tensors use Triton automatically when triton is installed (``ATTNPASS_TRITON=0`` turns
  that off).
* ``ATTNPASS_TRITON=1`` or ``with force_triton():`` sends CPU tensors to the Triton kernels too,
  run by Triton's interpreter (``TRITON_INTERPRET=1``); for testing the kernels without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import typing

__all__ = ["dispatching", "force_triton", "triton_available", "use_triton"]

_forced = 0  # process-wide (autograd may run the backward on another thread); nesting counter


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


def use_triton(t) -> bool:
    """Should an op whose first input is `t` run the Triton kernels?"""
    env = os.environ.get("ATTNPASS_TRITON", "")
    if _forced > 0 or env == "1":
        return True
    return env != "0" and t.device.type == "cuda" and triton_available()


def dispatching(torch_impl, triton_entry: str):
    """The function a sparse kernel op registers: `triton_entry` of `dispatch.py` when `use_triton`
    says so for the call's first tensor, else `torch_impl` (the PyTorch kernels), with the same
    arguments. The op's schema is `torch_impl`'s signature."""
    signature = inspect.signature(torch_impl)

    @functools.wraps(torch_impl)
    def op(*args, **kwargs):
        if not use_triton(args[0]):
            return torch_impl(*args, **kwargs)
        from attnpass.lowering.triton import dispatch  # imported on first use only

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return getattr(dispatch, triton_entry)(**bound.arguments)

    # torch.library reads the schema from the signature; its string annotations (PEP 563) name
    # types of torch_impl's module, so give it them evaluated there
    hints = typing.get_type_hints(torch_impl)
    op.__signature__ = signature.replace(
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
        return_annotation=hints.get("return", signature.return_annotation))
    return op
