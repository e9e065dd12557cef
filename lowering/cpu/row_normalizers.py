"""Row normalisers over (rows, width) logits: softmax and exact entmax-1.5, forward and VJP.

Shared by the kernels whose rows are a padded set of candidate keys (the CSR edge kernel's tiles,
the quantile-bucket kernel's candidate slots). Padding and masked slots hold -inf logits and get
probability 0; rows with no finite logit get probability 0 everywhere (their output is 0).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

NORMALIZERS = ("softmax", "entmax15")

# exp() on CPU falls to a slow path (4-15x) for vectors holding -inf or any input below where the
# result underflows (about -87 in float32), i.e. every masked tile and every row with a large
# logit spread (additive finfo.min masks). Inputs are clamped above that point and results at
# most exp(floor + 1) are then flushed to exactly 0: masked entries stay exact zeros, and an entry
# whose true value is below ~5e-35 (float32; ~3e-304 in float64) of the row maximum becomes 0.
_EXP_FLOOR = {torch.float64: -700.0}
_DEFAULT_EXP_FLOOR = -80.0


def flushed_exp_(x: Tensor) -> Tensor:
    """exp of x <= 0 (logits minus their row max or logsumexp), tiny results flushed to 0.

    In place (x is overwritten and returned), except when autograd records the call: then out of
    place, since exp's backward needs the output the in-place flush would overwrite.
    """
    floor = _EXP_FLOOR.get(x.dtype, _DEFAULT_EXP_FLOOR)
    cut = math.exp(floor + 1.0)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.nn.functional.threshold(torch.exp(x.clamp(min=floor)), cut, 0.0)
    return torch.nn.functional.threshold_(x.clamp_(min=floor).exp_(), cut, 0.0)


def _finite_max(x: Tensor) -> Tensor:
    """Row maximum; rows whose logits are all -inf (bias masks) give 0."""
    m = x.amax(-1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def softmax_stat(logits: Tensor) -> Tensor:
    """logsumexp per row; 0 for rows without a finite logit."""
    m = _finite_max(logits)
    z = flushed_exp_(logits - m.unsqueeze(-1)).sum(-1)
    return torch.where(z > 0, m + torch.log(z), torch.zeros_like(z))


# Rows wider than twice this first look at their top _TOP_FIRST entries only (see entmax15_stat).
_TOP_FIRST = 16


def entmax15_stat(logits: Tensor) -> Tensor:
    """Exact entmax-1.5 threshold tau per row: sum over the row of relu(logits / 2 - tau)^2 == 1.

    Within a row sorted descending (z_1 >= z_2 >= ...), if the support is the top r entries then
    tau_r = mean_r - sqrt((1 - ss_r) / r), with mean_r and ss_r (sum of squared deviations) of the
    top r; the support is the largest r with tau_r <= z_r. Rows without a finite logit give 0.

    tau >= max - 1 (the top entry alone has mass <= 1), so only entries within 1 of the row's
    maximum can be in the support. Wide rows are therefore first solved on their top _TOP_FIRST
    entries (a partial sort); a row whose _TOP_FIRST-th entry is still within 1 of its maximum may
    have more candidates and is solved again on the full sort. Same tau either way.
    """
    x = logits * 0.5
    mx = _finite_max(x)
    width = x.shape[-1]
    if width <= 2 * _TOP_FIRST:
        tau = _tau_sorted(torch.sort(x, dim=-1, descending=True).values, mx)
    else:
        top = torch.topk(x, _TOP_FIRST, dim=-1).values
        tau = _tau_sorted(top, mx)
        more = top[..., -1] >= mx - 1.0  # the row may have candidates beyond its top entries
        if bool(more.any()):
            tau[more] = _tau_sorted(torch.sort(x[more], dim=-1, descending=True).values, mx[more])
    finite = torch.isfinite(x).any(-1)
    return torch.where(finite, tau, torch.zeros_like(tau)).to(logits.dtype)


def _tau_sorted(top: Tensor, mx: Tensor) -> Tensor:
    """tau from each row's leading entries sorted descending (all of those within 1 of the max)."""
    # Clipping at max - 2 changes no tau (entries below max - 1 are never in the support) but keeps
    # the sums small with -1e9 bias masks, and padding (-inf) lands there too. float64 keeps the
    # cumulative sums exact enough.
    zs = (top - mx.unsqueeze(-1)).clamp(min=-2.0).to(torch.float64)
    rank = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=torch.float64)
    s1 = zs.cumsum(-1)
    mean = s1 / rank
    ss = (zs * zs).cumsum(-1) - s1 * mean
    tau_r = mean - torch.sqrt(torch.clamp((1.0 - ss) / rank, min=0.0))
    support = (tau_r <= zs).sum(-1, keepdim=True).clamp(min=1)
    return tau_r.gather(-1, support - 1).squeeze(-1) + mx.to(torch.float64)


def row_stat(logits: Tensor, normalizer: str) -> Tensor:
    """The row's normalising statistic: logsumexp (softmax) or threshold tau (entmax15)."""
    return softmax_stat(logits) if normalizer == "softmax" else entmax15_stat(logits)


def probs_from_stat(logits: Tensor, stat: Tensor, normalizer: str) -> Tensor:
    """Normalised probabilities from the logits (..., W) and their row's statistic (...)."""
    if normalizer == "softmax":
        return flushed_exp_(logits - stat.unsqueeze(-1))
    return torch.clamp(logits * 0.5 - stat.unsqueeze(-1), min=0).square()


def logits_grad(logits: Tensor, stat: Tensor, probs: Tensor, d_probs: Tensor, d_stat: Optional[Tensor],
                normalizer: str) -> Tensor:
    """Vector-Jacobian product through the normaliser, for both outputs (probs and row stat)."""
    if normalizer == "softmax":
        # d softmax: p * (dp - <p, dp>_row);  d logsumexp / d logits = p.
        grad = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        return grad if d_stat is None else grad + probs * d_stat.unsqueeze(-1)
    # entmax15: p = s^2, s = relu(logits/2 - tau). Differentiating sum(p) = 1 gives
    # d tau = <s, d logits> / (2 sum(s)), hence d logits = s * (dp - <s, dp> / sum(s)) and
    # d tau / d logits = s / (2 sum(s)).
    s = torch.clamp(logits * 0.5 - stat.unsqueeze(-1), min=0)
    s_sum = s.sum(-1, keepdim=True)
    # sum(s) > 0 in every row with a finite logit; rows whose logits are all -inf have s == 0.
    s_sum = torch.where(s_sum > 0, s_sum, torch.ones_like(s_sum))
    grad = s * (d_probs - (s * d_probs).sum(-1, keepdim=True) / s_sum)
    return grad if d_stat is None else grad + s * d_stat.unsqueeze(-1) / (2 * s_sum)


class _Normalize(torch.autograd.Function):
    """probs = normaliser(logits) along the last dim, with the exact VJP above."""

    @staticmethod
    def forward(ctx, logits: Tensor, normalizer: str) -> Tensor:
        stat = row_stat(logits, normalizer)
        probs = probs_from_stat(logits, stat, normalizer)
        ctx.save_for_backward(logits, stat, probs)
        ctx.normalizer = normalizer
        return probs

    @staticmethod
    def backward(ctx, d_probs: Tensor):
        logits, stat, probs = ctx.saved_tensors
        return logits_grad(logits, stat, probs, d_probs, None, ctx.normalizer), None


def normalize(logits: Tensor, normalizer: str) -> Tensor:
    """Differentiable softmax / entmax-1.5 over the last dim; rows of all -inf give zeros (not NaN)."""
    return _Normalize.apply(logits, normalizer)
