"""Triton lowering of the shared sparse attention kernels (grouped / block and CSR edge lists).

Kernels are generated from templates per specialisation (`generate.py`, `templates.py`) and
launched by `dispatch.py`. CUDA tensors use them automatically; CPU tensors use the PyTorch
kernels unless ``force_triton()`` / ``ATTNPASS_TRITON=1`` asks for Triton's interpreter
(``TRITON_INTERPRET=1``). Triton is an optional extra: importing this package does not import it.
"""
from attnpass.lowering.triton.generate import cache_dir, generated_kernels, kernel_source
from attnpass.lowering.triton.switch import force_triton, triton_available, use_triton

__all__ = ["cache_dir", "force_triton", "generated_kernels", "kernel_source", "triton_available", "use_triton"]
