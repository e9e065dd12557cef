"""The canonical attention op, `attnpass::attention`, with dense semantics.

Every detected site is first rewritten into one call of this op; it must reproduce the
model's own computation: scores = (q @ kᵀ) · scale + bias, pairs removed by the mask / causal
rule / key padding, softmax, dropout on the probabilities, then @ v. It is the correctness
anchor the sparse methods are measured against, and the `method="dense"` lowering.

Shapes: q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv), Hq % Hkv == 0 and q head h
reads kv head h // (Hq // Hkv). bias: additive, broadcastable to (B, Hq, Lq, Lk). mask: bool,
broadcastable to (B, Hq, Lq, Lk), True = pair allowed. key_keep: bool (B, Lk), True = real key.
causal: pair (i, j) allowed only if j <= i + causal_offset.

empty_rows: what a query with no allowed key outputs (the original model's output there depends
on its masking constant; see docs/semantics.md). "zero": zeros, and no gradient flows from it
(SDPA with a bool / -inf mask). "mean": the mean of v over all Lk keys of its kv head, what a
model with an additive finfo.min mask computes (all its scores are equal); its gradient flows to
v uniformly (1/Lk per key) and to nothing else.

sdpa_in_input_dtype: True when the site was F.scaled_dot_product_attention in the model, so SDPA
in the input dtype is its semantics at every dtype. False when the model's own eager code took
the softmax in float32 (a bf16/fp16 model): then the fused kernel is used only for float32 /
float64 inputs (where it computes the same function), the math path (softmax in fp32) otherwise.

Dropout. dropout_seed >= 0 draws the hashed counter stream `dropout_keep` (lowering/torch/common.py):
the keep decision for pair (b*H + h, i, j) is a pure function of (seed, pair), so the sparse
kernels, which draw the same stream pair by pair, can be checked against this op exactly; that
stream only exists in the math path (it builds the Lq x Lk probabilities). dropout_seed < 0 draws
with SDPA's own dropout (torch's global RNG): equal in distribution to the original model's
dropout, not bit-equal to any other kernel. The dense method serves users, not kernel checks, so
in training it passes -1 and runs SDPA (on CPU, SDPA itself runs its math kernel when dropout
is on, as the original model did); a "mean" empty row is not dropped.

Execution paths (all compute the function above; `_path` chooses):
- "flash": CPU's fused flash kernel (aten._scaled_dot_product_flash_attention_for_cpu, its
  backward for gradients, logsumexp kept from the forward): no Lq x Lk scores, native GQA.
  Causal with offset 0 runs the kernel's causal flag; Lq = 1 decode whose keys are all visible
  needs no mask; otherwise one additive mask in the input dtype, shaped (B or 1, 1 or Hq, Lq or 1,
  Lk) by broadcasting what the site has (never a per-head copy). Fully masked rows come out of
  the kernel as exact zeros with zero gradients (checked in tests/test_dense_fused.py); "mean"
  rows are then overwritten, their gradient added to dv.
- "sdpa": F.scaled_dot_product_attention, differentiable through its own autograd: SDPA's own
  dropout, a bias that requires grad, or a site the flash kernel refuses (SDPA then picks).
- "math": `dense_attention_math`, for the hashed dropout stream and for bf16/fp16 sites whose
  model took the softmax in float32.
The op is one node for torch.export / ONNX / torch.compile: a CompositeExplicitAutograd kernel,
a fake kernel and an Autograd kernel that builds the chosen path's graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpass.lowering.torch.common import dropout_keep

EMPTY_ROWS = ("zero", "mean")
_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_FLASH_CHOICE = 1  # int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)


def _check_empty_rows(empty_rows: str) -> None:
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"attnpass::attention: empty_rows must be one of {EMPTY_ROWS}, got {empty_rows!r}")


def dense_attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                         key_keep: Optional[Tensor], scale: float, causal: bool, causal_offset: int,
                         dropout_p: float, dropout_seed: int, empty_rows: str = "zero") -> Tensor:
    """Plain differentiable PyTorch implementation (builds the Lq x Lk scores: dense by definition).

    Follows the eager spelling step by step, softmax in float32 (or float64)."""
    _check_empty_rows(empty_rows)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # softmax in >= fp32, as models do
    allowed = mask
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(causal_offset)
        allowed = tri if allowed is None else allowed & tri
    if key_keep is not None:
        keep = key_keep[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None:
        allowed = allowed.expand(scores.shape)
        empty = ~allowed.any(dim=-1, keepdim=True)
        # an empty row's scores become constant 0: uniform probabilities, no gradient to q, k, bias
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
        probs = torch.softmax(scores, dim=-1)
        if empty_rows == "zero":
            probs = probs.masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        if dropout_seed < 0:  # torch's own stream (what SDPA / nn.Dropout draw)
            probs = F.dropout(probs, dropout_p, training=True)
        else:
            # the pair (b*H + h, i, j) hashed with the seed: the mask the sparse kernels draw for that pair
            b, h, lq, lk = probs.shape
            dev = q.device
            coords = (torch.arange(b * h, device=dev).view(b, h, 1, 1), torch.arange(lq, device=dev).view(lq, 1),
                      torch.arange(lk, device=dev))
            probs = probs * dropout_keep(dropout_seed, dropout_p, coords, probs.dtype)
    return torch.matmul(probs.to(v.dtype), v)


# ----------------------------------------------------------------------------------------------
# The fused paths


def _as4(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _plan(q: Tensor, k: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], key_keep: Optional[Tensor],
          causal: bool, causal_offset: int, empty_rows: str, causal_flag_ok: bool):
    """What to hand SDPA: (is_causal, additive mask in q.dtype or None, empty-row bool or None).

    The mask is the broadcast of what the site has: (1, 1, Lq, Lk) causal band, (B, 1, 1, Lk) key
    padding, the caller's mask / bias as they broadcast. `empty` ((B|1, H|1, Lq, 1), True = the
    row has no allowed key) is only computed for empty_rows="mean" (zero rows come out of the kernel
    as zeros); it is O(B * Lq) when the masking is causal + key padding only."""
    lq, lk = q.shape[-2], k.shape[-2]
    dev = q.device
    band = None     # causal restriction still to express, as a bool (Lq, Lk)
    is_causal = False
    if causal and causal_offset < lk - 1:  # otherwise every key is visible to every row (e.g. decode)
        if causal_offset == 0 and causal_flag_ok:
            is_causal = True
        else:
            band = torch.ones(lq, lk, dtype=torch.bool, device=dev).tril(causal_offset)
    restricted = causal and causal_offset < lk - 1
    keep = None if key_keep is None else key_keep[:, None, None, :]
    allowed = None
    for part in (band, None if mask is None else _as4(mask), keep):
        if part is not None:
            allowed = part if allowed is None else allowed & part

    if allowed is None:
        attn_mask = None if bias is None else _as4(bias).to(q.dtype)
    else:
        base = _as4(bias).to(q.dtype) if bias is not None else torch.zeros((), dtype=q.dtype, device=dev)
        attn_mask = torch.where(allowed, base, torch.tensor(float("-inf"), dtype=q.dtype, device=dev))
        if attn_mask.dim() < 4:
            attn_mask = _as4(attn_mask)

    empty = None
    if empty_rows == "mean" and (restricted or mask is not None or key_keep is not None):
        rows = torch.arange(lq, device=dev)
        if mask is None:
            # causal and/or key padding: row i is empty iff no kept key j <= i + offset
            last = rows + causal_offset if restricted else torch.full((lq,), lk - 1, device=dev)
            if key_keep is None:
                empty = (last < 0).view(1, 1, lq, 1)
            else:
                kept = key_keep.any(-1)
                first = torch.where(kept, key_keep.to(torch.uint8).argmax(-1), torch.full_like(kept, lk, dtype=torch.long))
                empty = (first[:, None] > last[None, :]).view(-1, 1, lq, 1)
        else:
            full = allowed
            if is_causal:
                full = full & torch.ones(lq, lk, dtype=torch.bool, device=dev).tril(0)
            empty = ~full.any(-1, keepdim=True)
    return is_causal, attn_mask, empty


def _fill_empty(out: Tensor, v: Tensor, empty: Optional[Tensor]) -> Tensor:
    """Rows flagged in `empty` get the mean of v over its keys (the "mean" rule)."""
    if empty is None:
        return out
    mean = v.mean(dim=2, keepdim=True)
    groups = out.shape[1] // v.shape[1]
    if groups > 1:
        mean = mean.repeat_interleave(groups, dim=1)
    return torch.where(empty, mean.to(out.dtype), out)


class _FlashAttention(torch.autograd.Function):
    """CPU flash forward (keeping its logsumexp) and the flash backward: no Lq x Lk tensor."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, empty):
        out, lse = _FLASH_FWD(q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, empty)
        ctx.is_causal, ctx.scale = is_causal, scale
        return _fill_empty(out, v, empty)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, attn_mask, empty = ctx.saved_tensors
        # `out` is the kernel's own output (zeros in empty rows): the backward's row sums need it
        gq, gk, gv = _FLASH_BWD(grad, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=attn_mask, scale=ctx.scale)
        if empty is not None:
            # mean rows: d out / d v[j] = 1/Lk for every key j of the row's kv head
            b, hkv, lk, dv = v.shape
            rows = (grad * empty).sum(dim=2)  # (B, Hq, Dv)
            rows = rows.view(rows.shape[0], hkv, -1, dv).sum(dim=2) / lk
            gv = gv + rows[:, :, None, :].to(gv.dtype)
        return gq, gk, gv, None, None, None, None


def _path(q: Tensor, bias: Optional[Tensor], dropout_p: float, dropout_seed: int, sdpa_in_input_dtype: bool,
          grad: bool) -> str:
    if dropout_p > 0.0 and dropout_seed >= 0:
        return "math"  # the hashed stream
    if not sdpa_in_input_dtype and q.dtype not in (torch.float32, torch.float64):
        return "math"  # the model's softmax ran in float32
    if dropout_p > 0.0 or q.device.type != "cpu" or (grad and bias is not None and bias.requires_grad):
        return "sdpa"
    return "flash"


def _attention(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
               empty_rows, sdpa_in_input_dtype, grad: bool) -> Tensor:
    _check_empty_rows(empty_rows)
    path = _path(q, bias, dropout_p, dropout_seed, sdpa_in_input_dtype, grad)
    if path == "math":
        return dense_attention_math(q, k, v, bias, mask, key_keep, scale, causal, causal_offset,
                                    dropout_p, dropout_seed, empty_rows)
    gqa = q.shape[1] != k.shape[1]
    if path == "flash":
        is_causal, attn_mask, empty = _plan(q, k, bias, mask, key_keep, causal, causal_offset, empty_rows, True)
        # the kernel's own admission test (head dims, dtype, the sdpa_kernel() context, ...)
        if torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=gqa) == _FLASH_CHOICE:
            if grad:
                return _FlashAttention.apply(q, k, v, attn_mask, is_causal, scale, empty)
            out, _ = _FLASH_FWD(q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
            return _fill_empty(out, v, empty)
    # SDPA refuses an attn_mask together with is_causal: fold the band into the mask then
    is_causal, attn_mask, empty = _plan(q, k, bias, mask, key_keep, causal, causal_offset, empty_rows,
                                        mask is None and bias is None and key_keep is None)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, enable_gqa=gqa)
    return _fill_empty(out, v, empty)


# ----------------------------------------------------------------------------------------------
# The op

_lib = torch.library.Library("attnpass", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? key_keep, float scale, "
    "bool causal, SymInt causal_offset, float dropout_p, SymInt dropout_seed, str empty_rows=\"zero\", "
    "bool sdpa_in_input_dtype=True) -> Tensor"
)


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    """The op's output layout, the same in the real and the fake kernel: q's memory layout (what
    the flash kernel returns, e.g. (B, L, H, D) in memory for a model's transposed q), contiguous
    when the value head dim differs."""
    if v.shape[-1] == q.shape[-1]:
        return torch.empty_like(q, memory_format=torch.preserve_format)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _impl(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
          empty_rows="zero", sdpa_in_input_dtype=True):
    with torch.no_grad():
        out = _attention(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
                         empty_rows, sdpa_in_input_dtype, grad=False)
        like = _out_like(q, v)
        return out if out.stride() == like.stride() else like.copy_(out)


def _autograd(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
              empty_rows="zero", sdpa_in_input_dtype=True):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        # builds the autograd graph of the chosen path (flash: one node with the fused backward)
        return _attention(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
                          empty_rows, sdpa_in_input_dtype, grad=True)
    with torch._C._AutoDispatchBelowAutograd():
        return attention(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
                         empty_rows, sdpa_in_input_dtype)


_lib.impl("attention", _impl, "CompositeExplicitAutograd")
_lib.impl("attention", _autograd, "Autograd")


@torch.library.register_fake("attnpass::attention")
def _(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed,
      empty_rows="zero", sdpa_in_input_dtype=True):
    return _out_like(q, v)


attention = torch.ops.attnpass.attention.default
