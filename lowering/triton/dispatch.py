"""Host side of the Triton kernels: check inputs, pick a specialisation, prepare tensors, launch.

The four entry points take exactly the arguments of the PyTorch kernels' implementations
(`lowering/torch/grouped_attention.py::forward_torch` / `backward_torch`, and the edge ones) and
return the same tuples, so the custom ops call them in place of the PyTorch code
(`switch.use_triton`). Inputs are validated by the PyTorch kernels' own checks, so errors read the
same on both paths.

What the kernels cover: every argument of both ops (GQA, cross-attention, causal with offset,
key padding, bias and pair_mask of any broadcast shape via strides, key_range, summaries with a
broadcast summary_mask, per-edge bias, dropout, both normalisers, gradients of q, k, v, bias,
summaries and edge_bias, a row-statistic gradient) for float16 / bfloat16 / float32 / float64.
Calls the kernels do not cover fall back to the PyTorch kernels (same results, recorded in
``FALLBACKS``): empty problems (a zero-size dim) and head dims above ``MAX_HEAD_DIM``.
"""
from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import Tensor

from attnpass.lowering.triton.specialise import constexprs, kernel, pow2_at_least

__all__ = ["FALLBACKS", "LAUNCHES", "MAX_BLOCK", "MAX_HEAD_DIM", "edge_backward", "edge_forward", "grouped_backward",
           "grouped_forward", "require_triton"]

MAX_HEAD_DIM = 256  # a (BLOCK_M, head dim) fp32 tile per operand must fit in registers
MAX_BLOCK = 64  # largest tile side (tests lower it to exercise multi-tile rows on tiny shapes)
FALLBACKS: collections.Counter = collections.Counter()  # reason -> calls sent to the PyTorch kernels
LAUNCHES: collections.Counter = collections.Counter()   # kernel kind -> launches (observability, tests)


def require_triton(device: torch.device):
    """Import triton, or explain how to get it; on CPU insist on the interpreter."""
    try:
        import triton
        from triton import knobs
    except ImportError as error:
        raise ImportError("attnpass: the Triton kernels need the 'triton' package; install it with "
                          "`pip install attnpass[triton]` (or run without ATTNPASS_TRITON=1 / "
                          "force_triton() to use the PyTorch kernels)") from error
    if device.type == "cpu" and not knobs.runtime.interpret:
        raise RuntimeError("attnpass: the Triton kernels were asked for on CPU tensors, which needs "
                           "Triton's interpreter: set the environment variable TRITON_INTERPRET=1 "
                           "(or leave ATTNPASS_TRITON / force_triton() off to use the PyTorch kernels)")
    return triton


def _pow2(n: int, low: int = 16, high: Optional[int] = None) -> int:
    return min(MAX_BLOCK if high is None else high, pow2_at_least(n, low))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _n_bisect(dtype: torch.dtype) -> int:
    # The exact correction after bisection only needs the support; steps past the dtype's
    # resolution change nothing.
    return {torch.float64: 30, torch.float32: 25}.get(dtype, 20)


def _acc(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dropout_args(dropout_p: float, dropout_seed: Optional[int]) -> tuple[int, int]:
    """(seed premix, keep threshold) of lowering/torch/common.py::dropout_keep."""
    if not dropout_p:
        return 0, 0
    from attnpass.lowering.torch.common import _MASK32, _mix32

    seed = int(dropout_seed)
    return _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32)), int(dropout_p * 2**32)


def _scalars(scale: float, dropout_p: float, like: Tensor) -> Tensor:
    # Loaded by the kernel rather than passed as a float argument: Triton passes floats as fp32,
    # which would round the scale of a float64 problem.
    return torch.tensor([scale, 1.0 / (1.0 - dropout_p)], dtype=_acc(like), device=like.device)


def _broadcast_strides(t: Optional[Tensor], shape: tuple) -> tuple[Optional[Tensor], tuple]:
    """`t` (bool read as uint8) and its strides when broadcast to `shape` (0 on broadcast dims).

    Computed rather than taken from ``t.expand(shape)``: no view of the full (…, Lq, Lk) size is
    ever created, even a free one (the memory probe in tests would rightly flag it).
    """
    if t is None:
        return None, (0,) * len(shape)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    pad = len(shape) - t.dim()
    strides = (0,) * pad + tuple(st if size != 1 else 0 for st, size in zip(t.stride(), t.shape))
    return t, strides


# The kernels below take no band (a sliding window, SiteSpec.window): such calls run the PyTorch kernels.
_BAND = "a band window"


def _fallback(reason: str, impl, *args, **kwargs):
    FALLBACKS[reason] += 1
    return impl(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Grouped attention
# --------------------------------------------------------------------------------------------


def _grouped_decline(q, v, q_index, k_index, summary_k) -> Optional[str]:
    if 0 in q.shape or 0 in v.shape or 0 in q_index.shape or 0 in k_index.shape[:3] or \
            (summary_k is not None and summary_k.shape[3] == 0 and k_index.shape[3] == 0):
        return "empty problem"
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    return None


def _grouped_launch(kind, extra_spec, q, k, v, q_index, k_index, key_padding_mask, bias, summary_k,
                    summary_v, summary_mask, pair_mask, key_range, scale, causal, causal_offset,
                    dropout_p, dropout_seed, normalizer, tail_args):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G, Wq, Wk = q_index.shape[2], q_index.shape[3], k_index.shape[3]
    S = 0 if summary_k is None else summary_k.shape[3]
    spec = dict(
        d=D, dv=Dv, block_m=_pow2(Wq), block_n=_pow2(Wk), block_s=_pow2(S, high=min(32, MAX_BLOCK)),
        dtype=_dtype_name(q.dtype), normalizer=normalizer, causal=bool(causal),
        padding=key_padding_mask is not None, bias=bias is not None, pair_mask=pair_mask is not None,
        key_range=key_range is not None, summary=summary_k is not None,
        summary_mask=summary_mask is not None, dropout=bool(dropout_p), n_bisect=_n_bisect(q.dtype),
        one_tile=summary_k is None and Wk <= _pow2(Wk), **extra_spec,
    )
    launch = kernel(kind)[(triton_cdiv(Wq, spec["block_m"]), G, B * Hq)]
    dummy = q
    bias4, sb = _broadcast_strides(bias, (B, Hq, Lq, Lk))
    pmask4, sp = _broadcast_strides(pair_mask, (B, Hq, Lq, Lk))
    if summary_k is not None:
        summary_k = summary_k if summary_k.stride(-1) == 1 else summary_k.contiguous()
        summary_v = summary_v if summary_v.stride(-1) == 1 else summary_v.contiguous()
        ssk, ssv = summary_k.stride()[:4], summary_v.stride()[:4]
    else:
        ssk = ssv = (0, 0, 0, 0)
    smask5, ssm = _broadcast_strides(summary_mask, (B, Hq, G, Wq, S))
    seed_mix, threshold = _dropout_args(dropout_p, dropout_seed)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)

    def ptr(t):
        return dummy if t is None else t

    launch(
        q.contiguous(), k.contiguous(), v.contiguous(), q_index.contiguous(), k_index.contiguous(),
        ptr(kpm), ptr(bias4), ptr(pmask4), ptr(None if key_range is None else key_range.contiguous()),
        ptr(summary_k), ptr(summary_v), ptr(smask5), _scalars(scale, dropout_p, q),
        int(causal_offset), seed_mix, threshold, Hq, Hkv, Lq, Lk, G, Wq, Wk, S,
        *sb, *sp, *ssk, *ssv, *ssm, *tail_args, **constexprs(kind, **spec),
    )
    LAUNCHES[kind] += 1
    return kind, spec


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouped_forward(q, k, v, q_index, k_index, key_padding_mask=None, bias=None, summary_k=None,
                    summary_v=None, summary_mask=None, pair_mask=None, key_range=None, *, scale,
                    causal=False, causal_offset=0, window=0, dropout_p=0.0, dropout_seed=None, normalizer="softmax"):
    """`attnpass::grouped_attention` on the Triton kernels -> (out_slots, row_stat)."""
    from attnpass.lowering.torch import grouped_attention as cpu

    args = (q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
            pair_mask, key_range)
    settings = dict(scale=scale, causal=causal, causal_offset=causal_offset, dropout_p=dropout_p,
                    dropout_seed=dropout_seed, normalizer=normalizer)
    cpu.check_inputs(*args, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    reason = _BAND if window else _grouped_decline(q, v, q_index, k_index, summary_k)
    if reason:
        return _fallback(reason, cpu.forward_torch, *args, **settings, window=window)
    require_triton(q.device)
    out_shape, stat_shape = cpu.output_shapes(v, q_index)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    row_stat = torch.empty(stat_shape, dtype=_acc(q), device=q.device)
    _grouped_launch("grouped_fwd", {}, *args, **settings, tail_args=(out, row_stat))
    return out, row_stat


def _grad_buffers(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, acc: torch.dtype):
    """Zeroed accumulators (dq, dk, dv, dbias or None) in `acc` for the atomic-add backward
    kernels, and dbias's strides broadcast to (B, Hq, Lq, Lk)."""
    dev = q.device
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=dev) for t in (q, k, v))
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=dev)
    _, db = _broadcast_strides(dbias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    return dq, dk, dv, dbias, db


def grouped_backward(grad_out, grad_stat, row_stat, q, k, v, q_index, k_index, key_padding_mask=None,
                     bias=None, summary_k=None, summary_v=None, summary_mask=None, pair_mask=None,
                     key_range=None, *, scale, causal=False, causal_offset=0, window=0, dropout_p=0.0,
                     dropout_seed=None, normalizer="softmax", bias_grad=False, summary_grad=False):
    """`attnpass::grouped_attention_backward` on the Triton kernels -> (dq, dk, dv, dbias, dsk, dsv)."""
    from attnpass.lowering.torch import grouped_attention as cpu

    args = (q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
            pair_mask, key_range)
    settings = dict(scale=scale, causal=causal, causal_offset=causal_offset, dropout_p=dropout_p,
                    dropout_seed=dropout_seed, normalizer=normalizer)
    cpu.check_inputs(*args, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    reason = _BAND if window else _grouped_decline(q, v, q_index, k_index, summary_k)
    if reason:
        return _fallback(reason, cpu.backward_torch, grad_out, grad_stat, row_stat, *args, **settings, window=window,
                         bias_grad=bias_grad, summary_grad=summary_grad)
    require_triton(q.device)
    acc, dev = _acc(q), q.device
    bias_grad = bool(bias_grad) and bias is not None
    summary_grad = bool(summary_grad) and summary_k is not None
    dq, dk, dv, dbias, db = _grad_buffers(q, k, v, bias if bias_grad else None, acc)
    dsk = torch.zeros(summary_k.shape, dtype=acc, device=dev) if summary_grad else None
    dsv = torch.zeros(summary_v.shape, dtype=acc, device=dev) if summary_grad else None
    dummy = dq
    tail = (grad_out.contiguous(), row_stat.contiguous(), dummy if grad_stat is None else grad_stat.contiguous(),
            dq, dk, dv, dummy if dbias is None else dbias, dummy if dsk is None else dsk,
            dummy if dsv is None else dsv, *db)
    extra = dict(bias_grad=bias_grad, summary_grad=summary_grad, dstat=grad_stat is not None)
    _grouped_launch("grouped_bwd", extra, *args, **settings, tail_args=tail)
    return (
        dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
        dbias.to(bias.dtype) if bias_grad else q.new_empty(0),
        dsk.to(summary_k.dtype) if summary_grad else q.new_empty(0),
        dsv.to(summary_v.dtype) if summary_grad else q.new_empty(0),
    )


# --------------------------------------------------------------------------------------------
# Edge (CSR) attention
# --------------------------------------------------------------------------------------------


def _edge_decline(q, k, v, col_index) -> Optional[str]:
    if 0 in q.shape or 0 in k.shape or 0 in v.shape:
        return "empty problem"
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    return None


def _edge_launch(kind, extra_spec, q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias,
                 scale, causal, causal_offset, dropout_p, dropout_seed, normalizer, tail_args):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    max_degree = int(row_ptr.diff().max()) if row_ptr.numel() > 1 else 0
    spec = dict(
        d=D, dv=Dv, block_n=_pow2(max_degree), dtype=_dtype_name(q.dtype), normalizer=normalizer,
        causal=bool(causal), padding=key_padding_mask is not None, bias=bias is not None,
        edge_bias=edge_bias is not None, dropout=bool(dropout_p), n_bisect=_n_bisect(q.dtype),
        one_tile=max_degree <= _pow2(max_degree), **extra_spec,
    )
    dummy = q
    bias4, sb = _broadcast_strides(bias, (B, Hq, Lq, Lk))
    seed_mix, threshold = _dropout_args(dropout_p, dropout_seed)
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
    kernel(kind)[(B * Hq * Lq,)](
        q.contiguous(), k.contiguous(), v.contiguous(), row_ptr.contiguous(), col_index.contiguous(),
        dummy if kpm is None else kpm, dummy if bias4 is None else bias4,
        dummy if edge_bias is None else edge_bias.contiguous(), _scalars(scale, dropout_p, q),
        int(causal_offset), seed_mix, threshold, Hq, Hkv, Lq, Lk, *sb, *tail_args, **constexprs(kind, **spec),
    )
    LAUNCHES[kind] += 1
    return kind, spec


def edge_forward(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias=None, *, scale, causal,
                 causal_offset, window=0, dropout_p, dropout_seed, normalizer):
    """`attnpass::edge_attention` on the Triton kernels -> (out, row_stat)."""
    from attnpass.lowering.torch import edge_attention as cpu

    args = (q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias)
    settings = dict(scale=scale, causal=causal, causal_offset=causal_offset, dropout_p=dropout_p,
                    dropout_seed=dropout_seed, normalizer=normalizer)
    cpu.check_inputs(*args, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    cpu.check_edges(row_ptr, col_index, k.shape[2])
    reason = _BAND if window else _edge_decline(q, k, v, col_index)
    if reason:
        return _fallback(reason, cpu.forward_torch, *args, **settings, window=window)
    require_triton(q.device)
    B, Hq, Lq, _ = q.shape
    out = torch.empty((B, Hq, Lq, v.shape[3]), dtype=q.dtype, device=q.device)
    row_stat = torch.empty((B, Hq, Lq), dtype=_acc(q), device=q.device)
    _edge_launch("edge_fwd", {}, *args, **settings, tail_args=(out, row_stat))
    return out, row_stat


def edge_backward(grad_out, grad_stat, row_stat, q, k, v, row_ptr, col_index, key_padding_mask, bias,
                  edge_bias, *, scale, causal, causal_offset, window=0, dropout_p, dropout_seed, normalizer,
                  bias_grad, edge_bias_grad):
    """`attnpass::edge_attention_backward` on the Triton kernels -> (dq, dk, dv, dbias, dedge_bias)."""
    from attnpass.lowering.torch import edge_attention as cpu

    args = (q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias)
    settings = dict(scale=scale, causal=causal, causal_offset=causal_offset, dropout_p=dropout_p,
                    dropout_seed=dropout_seed, normalizer=normalizer)
    cpu.check_inputs(*args, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    reason = _BAND if window else _edge_decline(q, k, v, col_index)
    if reason:
        return _fallback(reason, cpu.backward_torch, grad_out, grad_stat, row_stat, *args, **settings, window=window,
                         bias_grad=bias_grad, edge_bias_grad=edge_bias_grad)
    require_triton(q.device)
    acc, dev = _acc(q), q.device
    bias_grad = bool(bias_grad) and bias is not None
    edge_bias_grad = bool(edge_bias_grad) and edge_bias is not None
    dq, dk, dv, dbias, db = _grad_buffers(q, k, v, bias if bias_grad else None, acc)
    dedge = torch.zeros(col_index.shape, dtype=acc, device=dev) if edge_bias_grad else None
    dummy = dq
    tail = (grad_out.contiguous(), row_stat.contiguous(), dummy if grad_stat is None else grad_stat.contiguous(),
            dq, dk, dv, dummy if dbias is None else dbias, dummy if dedge is None else dedge, *db)
    extra = dict(bias_grad=bias_grad, edge_bias_grad=edge_bias_grad, dstat=grad_stat is not None)
    _edge_launch("edge_bwd", extra, *args, **settings, tail_args=tail)
    return (
        dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
        dbias.to(bias.dtype) if bias_grad else q.new_empty(0),
        dedge.to(edge_bias.dtype) if edge_bias_grad else q.new_empty(0),
    )
