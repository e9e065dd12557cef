"""Triton lowering of the shared sparse attention kernels (grouped / block and CSR edge lists).

The kernels are plain Triton specialised by ``tl.constexpr`` (`kernels.py`); `specialise.py` turns
a call's spec into those constexprs and `dispatch.py` launches. CUDA tensors use them
automatically; CPU tensors use the PyTorch kernels unless ``force_triton()`` /
``ATTNPASS_TRITON=1`` asks for Triton's interpreter (``TRITON_INTERPRET=1``). Triton is an
optional extra: importing this package does not import it.
"""
from attnpass.lowering.triton.specialise import constexprs
from attnpass.lowering.triton.switch import force_triton, triton_available, use_triton

__all__ = ["constexprs", "force_triton", "triton_available", "use_triton"]
