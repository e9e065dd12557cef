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


# Rows wider than twice this first look at their top _TOP_FIRST entries only (see entmax15_threshold).
_TOP_FIRST = 16


def entmax15_stat(logits: Tensor) -> Tensor:
    """Exact entmax-1.5 threshold tau per row: sum over the row of relu(logits / 2 - tau)^2 == 1.

    In the logits' dtype; rows without a finite logit give 0. See `entmax15_threshold`.
    """
    return entmax15_threshold(logits * 0.5).to(logits.dtype)


def entmax15_threshold(x: Tensor) -> Tensor:
    """The PyTorch backend's one entmax-1.5 threshold: tau per row of half-scores x = logits / 2
    (-inf = masked), with sum over the row of relu(x - tau)^2 == 1; float64, 0 for rows without a
    finite entry. The kernels' row statistic and Sparsefinder's gold graph both use it.

    Within a row sorted descending (z_1 >= z_2 >= ...), if the support is the top r entries then
    tau_r = mean_r - sqrt((1 - ss_r) / r), with mean_r and ss_r (sum of squared deviations) of the
    top r; the support is the largest r with tau_r <= z_r.

    tau >= max - 1 (the top entry alone has mass <= 1), so only entries within 1 of the row's
    maximum can be in the support. Wide rows are therefore solved on their top _TOP_FIRST entries
    (a partial sort), except rows with at least _TOP_FIRST entries within 1 of their maximum, which
    may have more candidates and are solved on the full sort. Same tau either way.
    """
    row_max = x.amax(-1)
    has_finite = torch.isfinite(row_max)
    mx = torch.where(has_finite, row_max, 0.0)
    broken = ~has_finite & (row_max != -math.inf)  # a +inf or NaN entry: look at each entry
    if bool(broken.any()):
        has_finite[broken] = torch.isfinite(x[broken]).any(-1)
    # Shifted by the max and clipped at -2 before any sort: no tau changes (entries below max - 1
    # are never in the support), the sums stay small with -1e9 bias masks, padding (-inf) lands at
    # -2 too, and a row whose tail is all one value sorts faster.
    z = (x - mx.unsqueeze(-1)).clamp_(min=-2.0)
    width = z.shape[-1]
    # rows with _TOP_FIRST candidates (entries within 1 of the max) may have more beyond their top
    more = (z >= -1.0).sum(-1) >= _TOP_FIRST if width > 2 * _TOP_FIRST else None
    n_more = 0 if more is None else int(more.sum())
    if more is None or 2 * n_more > more.numel():
        # narrow rows, or mostly flat ones (e.g. untrained attention): sorting every row costs less
        # than a partial sort plus gathering most rows again
        tau = _tau_sorted(torch.sort(z, dim=-1, descending=True).values)
    else:
        tau = _tau_sorted(torch.topk(z, _TOP_FIRST, dim=-1).values)
        if n_more:
            tau[more] = _tau_sorted(torch.sort(z[more], dim=-1, descending=True).values)
    return torch.where(has_finite, tau + mx.to(torch.float64), 0.0)


def _tau_sorted(zs: Tensor) -> Tensor:
    """tau - max from each row's leading shifted entries sorted descending (all of those within 1
    of the max); float64 keeps the cumulative sums exact enough."""
    zs = zs.to(torch.float64)
    rank = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=torch.float64)
    s1 = zs.cumsum(-1)
    mean = s1 / rank
    ss = (zs * zs).cumsum(-1) - s1 * mean
    tau_r = mean - torch.sqrt(torch.clamp((1.0 - ss) / rank, min=0.0))
    support = (tau_r <= zs).sum(-1, keepdim=True).clamp(min=1)
    return tau_r.gather(-1, support - 1).squeeze(-1)


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
