"""The canonical attention op, `attnpass::attention`, with dense semantics.

Every detected site is first rewritten into one call of this op; it must reproduce the
model's own computation, so its math follows the eager spelling step by step:
scores = (q @ kᵀ) · scale + bias, pairs removed by the mask / causal rule / key padding,
softmax in float32, dropout on the probabilities, then @ v. It is the correctness anchor
the sparse methods are measured against, and the `method="dense"` lowering.

Shapes: q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv), Hq % Hkv == 0 and q head h
reads kv head h // (Hq // Hkv). bias: additive, broadcastable to (B, Hq, Lq, Lk). mask: bool,
broadcastable to (B, Hq, Lq, Lk), True = pair allowed. key_keep: bool (B, Lk), True = real key.
causal: pair (i, j) allowed only if j <= i + causal_offset. A query with no allowed key gets
zeros (the original model's output there depends on its masking constant; see docs/semantics.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attnpass.lowering.cpu.common import dropout_keep


def dense_attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                         key_keep: Optional[Tensor], scale: float, causal: bool, causal_offset: int,
                         dropout_p: float, dropout_seed: int) -> Tensor:
    """Plain differentiable PyTorch implementation (builds the Lq x Lk scores: dense by definition)."""
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
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        # the pair (b*H + h, i, j) hashed with the seed: the mask the sparse kernels draw for that pair
        b, h, lq, lk = probs.shape
        dev = q.device
        coords = (torch.arange(b * h, device=dev).view(b, h, 1, 1), torch.arange(lq, device=dev).view(lq, 1),
                  torch.arange(lk, device=dev))
        probs = probs * dropout_keep(dropout_seed, dropout_p, coords, probs.dtype)
    return torch.matmul(probs.to(v.dtype), v)


@torch.library.custom_op("attnpass::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
              key_keep: Optional[Tensor], scale: float, causal: bool, causal_offset: int,
              dropout_p: float, dropout_seed: int) -> Tensor:
    return dense_attention_math(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed)


@attention.register_fake
def _(q, k, v, bias, mask, key_keep, scale, causal, causal_offset, dropout_p, dropout_seed):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.static = inputs[6:]


def _backward(ctx, grad):
    # Recompute through the differentiable math: exact gradients of the same function.
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:6]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(n) if t is not None and t.is_floating_point() else t
                  for t, n in zip(saved, needs)]
        out = dense_attention_math(*leaves, *ctx.static)
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True)) if wanted else iter(())
    return (*[next(grads) if n and t is not None else None for t, n in zip(leaves, needs)], None, None, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)
