"""Routing's keys='members': each cluster's keys are those its sampled member queries attend to most.

A cluster samples the members estimated to attend most to one far block of keys (`member_need`:
pooled block scores, Lq x Lk / NEED_BLOCK of them), computes their exact log-probabilities over every
key the method's layout may give them, and keeps, per key, the largest over its samples
(`member_key_scores`); the cluster then takes its top keys by that score. The exact scores are the
op ``attnpass::member_key_scores``: they run in chunks of at most _MEMBER_ROWS_PER_CHUNK sampled
queries per (batch row, head), a count the data decides, so traced (torch.export, the compile backend)
the loop stays inside one node with a fake kernel and the layout around it stays tensor code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from attnpass.methods.symbolic import ceil_div, read_size, view_merged

# Keys pooled per block when estimating which members attend far (`member_need`): Lq x Lk / 64 scores
NEED_BLOCK = 64
# Sampled member queries scored against every key at a time, per (batch row, head): keeps the scores of
# every head well under an Lq x Lk tensor (as the blocks predictor's chunks of `block` queries)
_MEMBER_ROWS_PER_CHUNK = 64


def in_proportion(members: Tensor, total: int, len_q) -> Tensor:
    """(B, H, c) int64: ceil(total * n / len_q) for each cluster of n members (members (B, H, c, W), -1 = none):
    a share of `total` in proportion to the cluster's queries, what a cluster of len_q / c gets total / c of."""
    n = (members >= 0).sum(dim=-1)
    return ceil_div(n * total, torch.sym_max(len_q, 1))


def member_key_scores(q: Tensor, k: Tensor, members: Tensor, key_keep: Tensor | None, *, causal: bool, offset,
                      scale: float, local: int, sampled_queries: int, nearest: bool) -> Tensor:
    """(B, H, c, Lk): how much each cluster's queries attend to each key its layout may hold, the
    largest log-probability over its sampled members (`sampled_members`), -inf at keys no sample may
    read. A key that one member attends to is kept for the cluster however far it is from the centroid.
    `offset` is the layout's causal offset and `local` the anchor's window (keys the layout leaves to it)."""
    rows, cluster = sampled_members(q, k, members, key_keep, causal=causal, offset=offset, scale=scale, local=local,
                                    sampled_queries=sampled_queries, nearest=nearest)
    return torch.ops.attnpass.member_key_scores(q, k, rows, cluster, key_keep, members.shape[2], scale, causal,
                                                offset, local)


def sampled_members(q: Tensor, k: Tensor, members: Tensor, key_keep: Tensor | None, *, causal: bool, offset,
                    scale: float, local: int, sampled_queries: int, nearest: bool) -> tuple[Tensor, Tensor]:
    """The members whose exact scores choose the clusters' keys: (rows (B, H, S) positions, -1 =
    none; their clusters (B, H, S)). Each cluster (members (B, H, c, W), -1 = none) samples the
    `sampled_queries` members (with nearest clusters: per Lq / c of them) that `member_need` ranks
    first, ties to the earlier position; a member with no far block is never sampled."""
    B, H, c, W = members.shape
    if nearest:  # samples in proportion to members: sampled_queries per Lq / c of them
        counts = in_proportion(members, sampled_queries * c, q.shape[2])
    else:
        counts = torch.full((B, H, c), sampled_queries, device=q.device)
    s = read_size(counts.max().clamp(min=1, max=W), 1, W)  # a size kept symbolic when traced
    need = member_need(q, k, key_keep, causal=causal, offset=offset, scale=scale, local=local)
    need = need.gather(2, view_merged(members.clamp(min=0), B, H, c * W)).view(B, H, c, W)
    need = need.masked_fill(members < 0, -math.inf)
    need, order = torch.sort(need, dim=-1, descending=True, stable=True)          # slots are by position
    taken = (need[..., :s] > -math.inf) & (torch.arange(s, device=q.device) < counts.unsqueeze(-1))
    rows = torch.where(taken, members.gather(-1, order[..., :s]), -1)
    cluster = torch.arange(c, device=q.device).view(c, 1).expand(B, H, c, s)
    return view_merged(rows, B, H, c * s), view_merged(cluster.contiguous(), B, H, c * s)


def member_need(q: Tensor, k: Tensor, key_keep: Tensor | None, *, causal: bool, offset, scale: float,
                local: int) -> Tensor:
    """(B, H, Lq) float32: each query's estimated largest log-probability on one block of NEED_BLOCK
    keys wholly in its method part (causal: ending at or before i + offset), as the blocks
    predictor estimates a block: its mean real key's score plus the log of its real keys, normalised
    over every block the query sees (the anchor's window too), plus the log of that count of blocks
    (how far above a uniform share it is); -inf where no such block exists.
    Lq x Lk / NEED_BLOCK scores: what it costs to find the few members that read far keys."""
    B, Hkv, Lk, D = k.shape
    H, Lq = q.shape[1], q.shape[2]
    blocks = ceil_div(Lk, NEED_BLOCK)
    keep = torch.ones(B, Lk, dtype=torch.bool, device=k.device) if key_keep is None else key_keep
    keep = torch.nn.functional.pad(keep, (0, blocks * NEED_BLOCK - Lk)).view(B, 1, blocks, NEED_BLOCK, 1)
    keys = torch.nn.functional.pad(k.to(torch.float32), (0, 0, 0, blocks * NEED_BLOCK - Lk))
    count = keep.sum(dim=3)                                                        # (B, 1, blocks, 1)
    mean = (keys.view(B, Hkv, blocks, NEED_BLOCK, D) * keep).sum(dim=3) / count.clamp(min=1)
    # each query head against its kv head's block means (blocks x D: copied per query head, not viewed:
    # a view of the grouped product's rows has strides the shape solver cannot prove contiguous)
    mean = mean.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q.to(torch.float32), mean.transpose(-1, -2)) * scale + count.view(B, 1, 1, blocks).log()
    if causal:
        first = torch.arange(blocks, device=q.device) * NEED_BLOCK
        last_key = torch.arange(Lq, device=q.device).view(Lq, 1) + offset             # the method's last key
        scores = scores.masked_fill(first > last_key + local, -math.inf)
        far = first + NEED_BLOCK - 1 <= last_key
    else:
        far = torch.ones(1, blocks, dtype=torch.bool, device=q.device)
    normaliser = torch.logsumexp(scores, dim=-1).nan_to_num(neginf=0.0)          # no block: nothing to rank
    # against the uniform share of the blocks it sees: a late query's 1 / 64 on the needle block says
    # more than an early query's 1 / 8 on one of its few blocks
    seen = torch.isfinite(scores).sum(dim=-1).clamp(min=1).log()
    return scores.masked_fill(~far, -math.inf).amax(dim=-1) - normaliser + seen


@torch.library.custom_op("attnpass::member_key_scores", mutates_args=())
def _member_key_scores_op(q: Tensor, k: Tensor, rows: Tensor, cluster: Tensor, key_keep: Optional[Tensor],
                          clusters: int, scale: float, causal: bool, offset: int, local: int) -> Tensor:
    """(B, H, clusters, Lk) float32: per cluster and key, the largest log-probability over the sampled
    rows (B, H, S; -1 = none) of that cluster (cluster (B, H, S)); in chunks of rows."""
    B, H = rows.shape[:2]
    Lk = k.shape[2]
    best = q.new_full((B, H, clusters, Lk), -math.inf, dtype=torch.float32)
    k = k.to(torch.float32)  # once, not per chunk
    for first in range(0, rows.shape[2], _MEMBER_ROWS_PER_CHUNK):
        chunk = slice(first, first + _MEMBER_ROWS_PER_CHUNK)
        log_probs = _log_probs_outside_anchor(q, k, rows[:, :, None, chunk], key_keep, causal, offset, scale, local)
        n = log_probs.shape[3]
        best.scatter_reduce_(2, cluster[:, :, chunk, None].expand(B, H, n, Lk), log_probs[:, :, 0], "amax")
    return best


@_member_key_scores_op.register_fake
def _(q, k, rows, cluster, key_keep, clusters, scale, causal, offset, local):
    return q.new_empty((rows.shape[0], rows.shape[1], clusters, k.shape[2]), dtype=torch.float32)


def _log_probs_outside_anchor(q: Tensor, k: Tensor, pos: Tensor, key_keep: Tensor | None, causal: bool,
                              offset: int, scale: float, local: int) -> Tensor:
    """(B, H, n, s, Lk) log-probabilities of the queries at `pos` (B, H, n, s; -1 = none) over the
    keys, -inf at the keys the method's layout cannot give them (the anchor's sinks and window:
    `offset` is the layout's and key_keep the method's, without the sinks; k float32). The normaliser
    holds the anchor's window, as the site's softmax does, but not its sinks (not in this key_keep)."""
    B, H, n, s = pos.shape
    Hkv, Lk, D = k.shape[1:]
    rows = q.gather(2, pos.clamp(min=0).reshape(B, H, n * s, 1).expand(B, H, n * s, D))
    logits = torch.matmul(rows.to(torch.float32).view(B, Hkv, (H // Hkv) * n * s, D),
                          k.transpose(-1, -2)).view(B, H, n, s, Lk) * scale
    sees = (pos >= 0).unsqueeze(-1)
    if key_keep is not None:
        sees = sees & key_keep[:, None, None, None, :]
        logits = logits.masked_fill(~key_keep[:, None, None, None, :], -math.inf)
    if causal:
        keys, last = torch.arange(Lk, device=q.device), pos.unsqueeze(-1) + offset
        logits = logits.masked_fill(keys > last + local, -math.inf)
        sees = sees & (keys <= last)
    # a row that sees no key at all: -inf - (-inf) would be NaN, and it scores nothing anyway
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    return log_probs.masked_fill(~sees, -math.inf)
