"""Sparsefinder's gold graph: the pairs with nonzero entmax-1.5 probability over the allowed keys
(or, with rule="mass", the fewest keys holding a share of the softmax mass), and the negatives
its fitter contrasts them with.

The gold graph (and so the metrics) needs each row's exact entmax threshold over all keys; `gold_pairs` computes it in chunks of query
rows (the kernels' threshold, in float64), so peak memory is O(chunk * Lk), never Lq x Lk at once.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from attnpass.lowering.torch.common import as_4d, read_at_pairs
from attnpass.lowering.torch.row_normalizers import entmax15_threshold
from attnpass.methods.sparsefinder.predictors import CHUNK_ELEMENTS


# --------------------------------------------------------------------------------------------
# Gold graph: the pairs with nonzero entmax-1.5 probability over the allowed keys
# --------------------------------------------------------------------------------------------


def _block(t: Tensor | None, b: int, h0: int, h1: int, i0: int, i1: int) -> Tensor | None:
    """bias / mask broadcastable to (B, H, Lq, Lk) -> its slice for batch row b, heads [h0, h1) and
    queries [i0, i1), broadcastable to (h1 - h0, i1 - i0, Lk) (broadcast dims stay size 1)."""
    if t is None:
        return None
    t = as_4d(t)
    t = t[b if t.shape[0] > 1 else 0]
    t = t[h0:h1] if t.shape[0] > 1 else t
    return t[:, i0:i1] if t.shape[1] > 1 else t


def _row_blocks(B: int, H: int, Lq: int, Lk: int):
    """(b, h0, h1, i0, i1) blocks of query rows holding about CHUNK_ELEMENTS scores each, in row order."""
    rows = max(1, CHUNK_ELEMENTS // max(Lk, 1))
    if rows >= Lq:  # whole heads per block
        heads = max(1, rows // max(Lq, 1))
        for b in range(B):
            for h0 in range(0, H, heads):
                yield b, h0, min(h0 + heads, H), 0, Lq
    else:
        for b in range(B):
            for h in range(H):
                for i0 in range(0, Lq, rows):
                    yield b, h, h + 1, i0, min(i0 + rows, Lq)


GOLD_RULES = ("entmax15", "mass")


def gold_pairs(q: Tensor, k: Tensor, *, scale: float, causal: bool = False, causal_offset: int = 0,
               key_keep: Tensor | None = None, bias: Tensor | None = None, mask: Tensor | None = None,
               rule: str = "entmax15", mass: float = 0.9) -> tuple[Tensor, Tensor]:
    """(row, col) pairs, sorted, of the gold graph of (q, k) over the allowed keys (no grad).

    rule "entmax15": the pairs with nonzero entmax-1.5 probability: allowed and x > tau, x = score / 2,
    with the kernels' exact row threshold tau (`row_normalizers.entmax15_threshold`).
    rule "mass" (a softmax model kept softmax): the smallest set of each row's keys holding at least
    `mass` of the row's softmax probability (its most probable keys, taken in order).
    Done on blocks of query rows (whole heads when short) in float64: O(CHUNK_ELEMENTS) memory,
    never Lq x Lk at once.
    """
    if rule not in GOLD_RULES:
        raise ValueError(f"gold graph rule {rule!r} must be one of {list(GOLD_RULES)}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    cols_all = torch.arange(Lk, device=dev)
    rows, cols = [], []
    with torch.no_grad():
        for b, h0, h1, i0, i1 in _row_blocks(B, Hq, Lq, Lk):
            heads = torch.arange(h0, h1, device=dev)
            kk = k[b].index_select(0, heads // group).to(torch.float64)  # (h, Lk, D)
            x = torch.matmul(q[b, h0:h1, i0:i1].to(torch.float64), kk.transpose(-1, -2)) * scale
            bias_c = _block(bias, b, h0, h1, i0, i1)
            if bias_c is not None:
                x = x + bias_c.to(torch.float64)
            x = x * 0.5
            allowed = torch.ones_like(x, dtype=torch.bool)
            if causal:
                allowed &= cols_all <= torch.arange(i0, i1, device=dev).unsqueeze(-1) + causal_offset
            if key_keep is not None:
                allowed &= key_keep[b]
            mask_c = _block(mask, b, h0, h1, i0, i1)
            if mask_c is not None:
                allowed &= mask_c
            allowed &= x > -math.inf  # a -inf bias masks too
            if rule == "mass":
                hit = allowed & _top_mass(x, allowed, mass)
            else:
                tau = entmax15_threshold(torch.where(allowed, x, -torch.inf))
                hit = allowed & (x > tau.unsqueeze(-1))
            hh, i, j = hit.nonzero(as_tuple=True)
            rows.append((b * Hq + h0 + hh) * Lq + i0 + i)
            cols.append(j)
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def _top_mass(half_scores: Tensor, allowed: Tensor, mass: float) -> Tensor:
    """(..., Lk) bool: each row's most probable keys (softmax over the allowed ones) until their
    probabilities sum to at least `mass`; the key that crosses the line is included."""
    probs = torch.softmax(torch.where(allowed, 2.0 * half_scores, -torch.inf), dim=-1).nan_to_num(0.0)
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the keys ranked above each key
    return torch.zeros_like(allowed).scatter_(-1, order, before < mass)


def sample_negatives(g_row: Tensor, g_col: Tensor, *, B: int, H: int, Lq: int, Lk: int, causal: bool = False,
                     causal_offset: int = 0, key_keep: Tensor | None = None, bias: Tensor | None = None,
                     mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One uniform draw among each gold pair's row's allowed keys; draws that land on a gold key or
    on a pair the mask (or a -inf bias) forbids are rejected. O(|gold|) work, no Lq x Lk tensor.

    The allowed keys of row (b, h, i) are the real keys at positions <= i + offset (causal) or all
    real keys: the first n of them in position order, so rank u maps to a position through the real
    keys sorted by position.
    """
    dev = g_row.device
    if g_row.numel() == 0:
        return g_row, g_col
    keep = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_keep is None else key_keep
    real_in_order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # (B, Lk) real positions first
    real_upto = torch.cat([keep.new_zeros(B, 1, dtype=torch.int64), keep.long().cumsum(-1)], dim=-1)
    b = g_row // (H * Lq)
    i = g_row % Lq
    limit = (i + causal_offset + 1).clamp(0, Lk) if causal else torch.full_like(i, Lk)
    n_allowed = real_upto[b, limit]
    u = (torch.rand(g_row.shape, device=dev) * n_allowed).long().clamp(max=Lk - 1)
    col = real_in_order[b, u]
    ok = n_allowed > 0
    gold_key = g_row * Lk + g_col  # sorted: gold_pairs emits rows in order, columns sorted
    key = g_row * Lk + col
    pos = torch.searchsorted(gold_key, key).clamp(max=gold_key.numel() - 1)
    ok &= gold_key[pos] != key
    bh = g_row // Lq
    coords = (b, bh % H, i, col)
    for t, forbidden in ((mask, lambda x: ~x), (bias, lambda x: x == -math.inf)):
        if t is not None:
            ok &= ~forbidden(read_at_pairs(t, coords))
    return g_row[ok], col[ok]


