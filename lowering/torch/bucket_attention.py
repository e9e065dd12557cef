"""Attention over quantile buckets: each query attends the keys sharing its bucket in any of r views.

The layout of Sparsefinder's quantization predictor, computed as blocks instead of an edge list.
In each view d (a projected dimension), queries and keys are ranked separately (`q_order`,
`key_order`: positions in rank order); the n real keys of a batch row are cut into
n_b = ceil(n / bucket_size) buckets of consecutive ranks, and query rank i goes to bucket
floor(i * n_b / Lq). Query i's candidate keys are the union over views of its bucket's keys, plus
optional per-query `extra_cols` (a local window, the first token); the row is normalised (softmax
or entmax-1.5) over that set, each key once.

Why blocks: the same pairs as a CSR cost one gathered key row and value row per edge (~r * bucket
rows per query); here a bucket's queries and keys are gathered once per view into
(buckets, queries per bucket, D) and (buckets, bucket_size, D) blocks, and the scores and the
weighted values are batched matmuls of those blocks. Query ranks split evenly over the buckets, so
a bucket holds at most ceil(Lq / n_b) queries and the padded blocks are O(r * (Lq + Lk) * D): no
Lq x Lk tensor.

Shapes::

    q (B, Hq, Lq, D)   k (B, Hkv, Lk, D)   v (B, Hkv, Lk, Dv)   Hq % Hkv == 0 (GQA: head h reads h // (Hq//Hkv))
    q_order   (B, Hq, r, Lq) int64   query positions in rank order, per view (a permutation of [0, Lq))
    key_order (B, Hq, r, Lk) int64   key positions in rank order, per view (a permutation of [0, Lk)),
                                     real keys first when key_padding_mask is given
    extra_cols (B, Hq, Lq, W) int64  more keys per query, -1 = none, distinct within a row (or None)
    key_padding_mask (B, Lk) bool    True = real key
    bias  broadcastable to (B, Hq, Lq, Lk), read only at the candidate pairs
    mask  broadcastable to (B, Hq, Lq, Lk) bool, True = keep; read only at the candidate pairs
    out   (B, Hq, Lq, Dv) in q's dtype; rows without an allowed key are 0

Causal pairs (j > i + causal_offset), pairs outside a band (a window w: distance >= w from i + causal_offset,
causal: j <= i + causal_offset - w) and padding keys are dropped. Dropout uses the hash of the
other kernels (`common.dropout_keep` on (b*Hq + h, i, j)), so a seed drops the same pairs here and
in `edge_attention`. Built from differentiable PyTorch ops (autograd gives the backward) and the
normalisers' exact VJP (`row_normalizers.normalize`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attnpass.lowering.torch.common import broadcastable, check, check_qkv, dropout_keep, read_at_pairs
from attnpass.lowering.torch.row_normalizers import NORMALIZERS, normalize

__all__ = ["quantile_bucket_attention", "bucket_layout"]


def _check(condition: bool, message: str, error: type = ValueError) -> None:
    check("quantile_bucket_attention", condition, message, error)


def quantile_bucket_attention(
    q: Tensor, k: Tensor, v: Tensor, q_order: Tensor, key_order: Tensor, bucket_size: int,
    extra_cols: Optional[Tensor] = None, *, scale: float, causal: bool = False, causal_offset: int = 0, window: int = 0,
    key_padding_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
    dropout_p: float = 0.0, dropout_seed: Optional[int] = None, normalizer: str = "softmax",
) -> Tensor:
    """Attention of each query to its buckets' keys in every view plus its extra keys (module docstring)."""
    _validate(q, k, v, q_order, key_order, bucket_size, extra_cols, key_padding_mask, bias, mask, scale,
              dropout_p, normalizer)
    if dropout_seed is None and dropout_p > 0:
        dropout_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if Lq == 0 or Lk == 0:
        return _zeros_connected(q, k, v, torch.arange(B, device=q.device), acc).to(q.dtype)
    n_real = torch.full((B,), Lk, device=q.device) if key_padding_mask is None else key_padding_mask.sum(-1)
    # Batch rows with the same number of real keys share one bucket count: one pass each (a pass
    # over rows with different counts would pad every row to the largest queries-per-bucket).
    parts = []
    for n in torch.unique(n_real).tolist():
        rows = (n_real == n).nonzero().squeeze(1)
        parts.append((rows, _attend(q, k, v, q_order, key_order, bucket_size, extra_cols, rows, int(n), acc,
                                    scale=scale, causal=causal, causal_offset=causal_offset, window=window,
                                    key_padding_mask=key_padding_mask, bias=bias, mask=mask,
                                    dropout_p=dropout_p, dropout_seed=dropout_seed, normalizer=normalizer)))
    if len(parts) == 1:
        return parts[0][1].to(q.dtype)
    out = q.new_zeros(B, Hq, Lq, v.shape[3], dtype=acc)
    return out.index_put((torch.cat([r for r, _ in parts]),), torch.cat([o for _, o in parts])).to(q.dtype)


def bucket_layout(Lq: int, n_real: int, bucket_size: int, device=None) -> tuple[int, Tensor, Tensor]:
    """(n_buckets, block_rank (n_b, M), query_bucket (Lq,)) of the quantile buckets.

    block_rank[t, m] is the query rank in slot m of bucket t (-1 = empty slot); query_bucket[i] the
    bucket of query rank i. M = ceil(Lq / n_b): ranks split evenly, so no bucket holds more.
    """
    n_buckets = -(-n_real // bucket_size)
    if n_buckets == 0:
        return 0, torch.zeros(0, 0, dtype=torch.int64, device=device), torch.zeros(Lq, dtype=torch.int64, device=device)
    rank = torch.arange(Lq, device=device)
    query_bucket = rank * n_buckets // Lq
    t = torch.arange(n_buckets + 1, device=device)
    first = (t * Lq + n_buckets - 1) // n_buckets  # smallest rank i with i * n_b // Lq >= t
    count = first[1:] - first[:-1]
    width = -(-Lq // n_buckets)
    slot = torch.arange(width, device=device)
    block_rank = torch.where(slot < count.unsqueeze(1), first[:-1].unsqueeze(1) + slot, -1)
    return n_buckets, block_rank, query_bucket


@dataclass
class _Pass:
    """The batch rows of one pass (all with n_real real keys) and their bucket layout.

    Block tensors are laid out (n, Hq, r, n_b, M or bs, ...), n = len(rows); a query's candidate
    row is (n, Hq, Lq, r * bs + extras), view by view.
    """

    rows: Tensor         # (n,) batch rows
    n_real: int
    n_buckets: int       # n_b
    width: int           # M: query slots per bucket block
    bucket_size: int     # bs
    views: int           # r
    block_ok: Tensor     # (n_b, M) the block slot holds a query
    q_bucket: Tensor     # (n, Hq, Lq, r) each query's bucket per view
    k_bucket: Tensor     # (n, Hq, r, Lk) each key's bucket per view, -1 for padding keys
    q_pos: Tensor        # (n, Hq, r, n_b * M) query position of each block slot
    q_slot: Tensor       # (n, Hq, Lq, r) each query's row in the flattened (.., n_b * M) blocks
    k_pos: Tensor        # (n, Hq, r, n_b * bs) key position of each block slot (clamped past n_real)
    kv_base: Tensor      # (n, Hq, 1, 1) first row of the head's keys in k.reshape(-1, D)
    head_row: Tensor     # (n, Hq, 1) index of (row, head) in B * Hq order, local rows


def _plan(q_order: Tensor, key_order: Tensor, rows: Tensor, n_real: int, bucket_size: int, Hkv: int) -> _Pass:
    """The bucket layout of the batch rows `rows` (index tables only; no q, k, v is read)."""
    n, (Hq, r, Lq) = rows.numel(), q_order.shape[1:]
    Lk = key_order.shape[3]
    dev = q_order.device
    q_order, key_order = q_order.index_select(0, rows), key_order.index_select(0, rows)
    n_buckets, block_rank, query_bucket = bucket_layout(Lq, n_real, bucket_size, dev)
    width = block_rank.shape[1]
    h = torch.arange(Hq, device=dev)
    kv_base = ((rows.view(-1, 1) * Hkv + h // (Hq // Hkv)) * Lk).view(n, Hq, 1, 1)
    head_row = (torch.arange(n, device=dev).view(-1, 1) * Hq + h).view(n, Hq, 1)

    # each query's rank per view -> its bucket and its row in the bucket blocks
    q_rank = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(Lq, device=dev).expand_as(q_order))
    q_bucket = query_bucket[q_rank]                                              # (n, Hq, r, Lq)
    in_block = q_bucket * width + q_rank - block_rank[q_bucket, 0] if n_buckets else q_rank
    q_slot = ((head_row * r + torch.arange(r, device=dev)).unsqueeze(-1) * (n_buckets * width) + in_block)
    # key ranks per view -> bucket of each real key (padding keys never sit in a bucket)
    k_rank = torch.empty_like(key_order).scatter_(-1, key_order, torch.arange(Lk, device=dev).expand_as(key_order))
    k_bucket = torch.where(k_rank < n_real, k_rank // bucket_size, -1)
    slots = block_rank.clamp(min=0).view(1, 1, 1, -1).expand(n, Hq, r, -1)
    key_ranks = torch.arange(n_buckets * bucket_size, device=dev).clamp(max=max(Lk - 1, 0))
    return _Pass(
        rows=rows, n_real=n_real, n_buckets=n_buckets, width=width, bucket_size=bucket_size, views=r,
        block_ok=block_rank >= 0, q_bucket=q_bucket.transpose(-1, -2), k_bucket=k_bucket,
        q_pos=q_order.gather(-1, slots), q_slot=q_slot.transpose(-1, -2),
        k_pos=key_order.gather(-1, key_ranks.view(1, 1, 1, -1).expand(n, Hq, r, -1)),
        kv_base=kv_base, head_row=head_row)


def _bucket_candidates(q: Tensor, k: Tensor, v: Tensor, p: _Pass, scale: float, acc: torch.dtype):
    """Scores of every query against its bucket's keys in each view, computed as block matmuls:
    logits (n, Hq, Lq, r * bs), key columns (-1: no key, or counted in an earlier view) and the
    value blocks (n, Hq, r, n_b, bs, Dv) for the output."""
    n, Hq, Lq, r = p.q_bucket.shape
    D, Dv = q.shape[3], v.shape[3]
    nb, M, bs = p.n_buckets, p.width, p.bucket_size
    dev = q.device
    q_rows = ((p.rows.view(-1, 1) * Hq + torch.arange(Hq, device=dev)) * Lq).view(n, Hq, 1, 1) + p.q_pos
    q_block = q.reshape(-1, D).index_select(0, q_rows.reshape(-1)).view(n, Hq, r, nb, M, D).to(acc)
    kv_rows = (p.kv_base + p.k_pos).reshape(-1)
    k_block = k.reshape(-1, D).index_select(0, kv_rows).view(n, Hq, r, nb, bs, D).to(acc)
    v_block = v.reshape(-1, Dv).index_select(0, kv_rows).view(n, Hq, r, nb, bs, Dv).to(acc)
    scores = torch.matmul(q_block, k_block.transpose(-1, -2)) * scale            # (n, Hq, r, nb, M, bs)
    logits = scores.reshape(-1, bs).index_select(0, p.q_slot.reshape(-1)).view(n, Hq, Lq, r * bs)

    slot_rank = p.q_bucket.unsqueeze(-1) * bs + torch.arange(bs, device=dev)     # (n, Hq, Lq, r, bs)
    view_base = (p.head_row * r + torch.arange(r, device=dev)).view(n, Hq, 1, r, 1) * (nb * bs)
    cols = p.k_pos.reshape(-1)[view_base + slot_rank]
    ok = slot_rank < p.n_real
    # a key in the query's bucket of an earlier view is a candidate there already: count it once
    for earlier in range(r - 1):
        later = cols[:, :, :, earlier + 1:]
        in_earlier = _key_bucket_at(p.k_bucket[:, :, earlier], later) == p.q_bucket[..., earlier, None, None]
        ok[:, :, :, earlier + 1:] &= ~in_earlier
    return logits, torch.where(ok, cols, -1).reshape(n, Hq, Lq, r * bs), v_block


def _extra_candidates(q: Tensor, k: Tensor, v: Tensor, extra_cols: Tensor, p: _Pass, scale: float, acc: torch.dtype):
    """Scores of every query against its extra keys: logits (n, Hq, Lq, W), key columns (-1: none,
    or already in one of the query's buckets) and the gathered values (n, Hq, Lq, W, Dv)."""
    n, Hq, Lq, _ = p.q_bucket.shape
    D, Dv = q.shape[3], v.shape[3]
    ext = extra_cols.index_select(0, p.rows)                                     # (n, Hq, Lq, W)
    W = ext.shape[-1]
    rows = (p.kv_base + ext.clamp(min=0)).reshape(-1)
    k_ext = k.reshape(-1, D).index_select(0, rows).view(n, Hq, Lq, W, D).to(acc)
    logits = torch.matmul(k_ext, q.index_select(0, p.rows).to(acc).unsqueeze(-1)).squeeze(-1) * scale
    ok = ext >= 0
    if p.n_buckets:
        for view in range(p.views):
            ok &= _key_bucket_at(p.k_bucket[:, :, view], ext) != p.q_bucket[..., view, None]
    v_ext = v.reshape(-1, Dv).index_select(0, rows).view(n, Hq, Lq, W, Dv).to(acc)
    return logits, torch.where(ok, ext, -1), v_ext


def _bucket_output(probs: Tensor, v_block: Tensor, p: _Pass) -> Tensor:
    """sum over each query's bucket slots of probs * v, as block matmuls: (n, Hq, Lq, Dv)."""
    n, Hq, Lq, r = p.q_bucket.shape
    nb, M, bs = p.n_buckets, p.width, p.bucket_size
    Dv = v_block.shape[-1]
    # back to blocks: block slot (view, bucket, m) holds the query at q_pos -> its row of probs
    p_rows = ((p.head_row.unsqueeze(-1) * Lq + p.q_pos) * r
              + torch.arange(r, device=probs.device).view(1, 1, r, 1))           # (n, Hq, r, nb * M)
    p_block = probs.reshape(-1, bs).index_select(0, p_rows.reshape(-1)).view(n, Hq, r, nb, M, bs)
    p_block = p_block * p.block_ok.view(1, 1, 1, nb, M, 1)
    out_block = torch.matmul(p_block, v_block).reshape(-1, Dv)
    return out_block.index_select(0, p.q_slot.reshape(-1)).view(n, Hq, Lq, r, Dv).sum(3)


def _attend(q, k, v, q_order, key_order, bucket_size, extra_cols, rows, n_real, acc, *, scale, causal,
            causal_offset, window, key_padding_mask, bias, mask, dropout_p, dropout_seed, normalizer) -> Tensor:
    """Output (len(rows), Hq, Lq, Dv) in `acc` for the batch rows `rows`, which all have n_real real keys."""
    p = _plan(q_order, key_order, rows, n_real, bucket_size, k.shape[1])
    n, Hq, Lq, r = p.q_bucket.shape
    bucket_width = r * bucket_size if p.n_buckets else 0
    logits, cols, values = [], [], {}
    if p.n_buckets:
        bucket_logits, bucket_cols, values["bucket"] = _bucket_candidates(q, k, v, p, scale, acc)
        logits.append(bucket_logits)
        cols.append(bucket_cols)
    if extra_cols is not None and extra_cols.shape[-1] > 0:
        extra_logits, extra_cols_ok, values["extra"] = _extra_candidates(q, k, v, extra_cols, p, scale, acc)
        logits.append(extra_logits)
        cols.append(extra_cols_ok)
    if not logits:
        return _zeros_connected(q, k, v, rows, acc)
    logits, cols = torch.cat(logits, -1), torch.cat(cols, -1)                    # (n, Hq, Lq, C)
    allowed = _allowed(cols, rows, Hq, Lq, causal, causal_offset, window, key_padding_mask, mask)
    if bias is not None:
        logits = logits + _pair_values(bias, cols, rows, Hq, Lq).to(acc)
    probs = normalize(logits.masked_fill(~allowed, -math.inf), normalizer)
    if dropout_p > 0:
        bh = (rows.view(-1, 1) * Hq + torch.arange(Hq, device=q.device)).view(n, Hq, 1, 1)
        i = torch.arange(Lq, device=q.device).view(1, 1, Lq, 1)
        probs = probs * dropout_keep(dropout_seed, dropout_p, (bh, i, cols.clamp(min=0)), acc)
    out = q.new_zeros(n, Hq, Lq, v.shape[3], dtype=acc)
    if "bucket" in values:
        out = out + _bucket_output(probs[..., :bucket_width], values["bucket"], p)
    if "extra" in values:
        out = out + torch.matmul(probs[..., bucket_width:].unsqueeze(-2), values["extra"]).squeeze(-2)
    return out


def _zeros_connected(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, acc: torch.dtype) -> Tensor:
    """Zeros of the output's shape for batch rows `rows` (no candidate anywhere), computed as
    attention over zero keys: still in the autograd graph, so backward runs and gives zero gradients
    (a plain zeros tensor would make loss.backward() fail on such a batch)."""
    q_rows = q.index_select(0, rows).to(acc)
    no_keys = k.index_select(0, rows)[:, :1, :0].to(acc)     # (n, 1, 0, D)
    no_values = v.index_select(0, rows)[:, :1, :0].to(acc)   # (n, 1, 0, Dv)
    return torch.matmul(torch.matmul(q_rows, no_keys.transpose(-1, -2)), no_values)


def _key_bucket_at(key_bucket: Tensor, cols: Tensor) -> Tensor:
    """key_bucket (n, Hq, Lk) read at key positions cols (n, Hq, ...) (-1 reads position 0)."""
    n, Hq = cols.shape[:2]
    return key_bucket.gather(-1, cols.clamp(min=0).reshape(n, Hq, -1)).view(cols.shape)


def _pair_values(t: Tensor, cols: Tensor, rows: Tensor, Hq: int, Lq: int) -> Tensor:
    """`t` (broadcastable to (B, Hq, Lq, Lk)) at every candidate (cols (n, Hq, Lq, C) of batch rows `rows`)."""
    dev = cols.device
    return read_at_pairs(t, (rows.view(-1, 1, 1, 1), torch.arange(Hq, device=dev).view(1, Hq, 1, 1),
                             torch.arange(Lq, device=dev).view(1, 1, Lq, 1), cols.clamp(min=0)))


def _allowed(cols: Tensor, rows: Tensor, Hq: int, Lq: int, causal: bool, causal_offset: int, window: int,
             key_padding_mask: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """Which candidates (n, Hq, Lq, C) are real pairs the causal rule, padding and mask allow."""
    ok = cols >= 0
    query_pos = torch.arange(Lq, device=cols.device).view(1, 1, Lq, 1) + causal_offset
    if causal:
        ok &= cols <= query_pos
    if window:  # a band: keys at distance < window (causal: before the query only)
        ok &= (cols > query_pos - window) if causal else ((cols - query_pos).abs() < window)
    if key_padding_mask is not None:
        n = rows.numel()
        ok &= key_padding_mask.index_select(0, rows).gather(1, cols.clamp(min=0).reshape(n, -1)).view(cols.shape)
    if mask is not None:
        ok &= _pair_values(mask, cols, rows, Hq, Lq)
    return ok


def _is_permutation(order: Tensor) -> bool:
    counts = torch.zeros_like(order).scatter_add_(-1, order, torch.ones_like(order))
    return bool((counts == 1).all())


def _validate(q, k, v, q_order, key_order, bucket_size, extra_cols, key_padding_mask, bias, mask, scale,
              dropout_p, normalizer) -> None:
    _check(normalizer in NORMALIZERS, f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    _check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0,
           f"dropout_p must be in [0, 1), got {dropout_p!r}")
    _check(math.isfinite(scale), f"scale must be finite, got {scale!r}")
    _check(isinstance(bucket_size, int) and bucket_size >= 1, f"bucket_size must be an int >= 1, got {bucket_size!r}")
    check_qkv("quantile_bucket_attention", q, k, v)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    for name, t, length in (("q_order", q_order, Lq), ("key_order", key_order, Lk)):
        _check(t.dtype == torch.int64, f"{name} must be int64, got {t.dtype}", TypeError)
        _check(t.dim() == 4 and tuple(t.shape[:2]) == (B, Hq) and t.shape[3] == length,
               f"{name} must be (B={B}, Hq={Hq}, r, {length}), got shape {tuple(t.shape)}")
        _check(t.numel() == 0 or _is_permutation(t), f"every row of {name} must be a permutation of [0, {length})")
    _check(q_order.shape[2] == key_order.shape[2],
           f"q_order and key_order have different view counts: {q_order.shape[2]} vs {key_order.shape[2]}")
    if key_padding_mask is not None:
        _check(key_padding_mask.dtype == torch.bool, f"key_padding_mask must be bool, got {key_padding_mask.dtype}",
               TypeError)
        _check(tuple(key_padding_mask.shape) == (B, Lk),
               f"key_padding_mask must be (B={B}, Lk={Lk}), got {tuple(key_padding_mask.shape)}")
        if key_order.numel():
            n_real = key_padding_mask.sum(-1).view(B, 1, 1, 1)
            real_at_rank = key_padding_mask.gather(1, key_order.reshape(B, -1)).view(key_order.shape)
            rank = torch.arange(Lk, device=q.device)
            _check(bool((real_at_rank == (rank < n_real)).all()),
                   "key_order must list the real keys (key_padding_mask True) before the padding keys")
    if extra_cols is not None:
        _check(extra_cols.dtype == torch.int64, f"extra_cols must be int64, got {extra_cols.dtype}", TypeError)
        _check(extra_cols.dim() == 4 and tuple(extra_cols.shape[:3]) == (B, Hq, Lq),
               f"extra_cols must be (B={B}, Hq={Hq}, Lq={Lq}, W), got shape {tuple(extra_cols.shape)}")
        if extra_cols.numel():
            _check(int(extra_cols.min()) >= -1 and int(extra_cols.max()) < Lk,
                   f"extra_cols values must be -1 (none) or in [0, Lk={Lk})")
            ordered = extra_cols.sort(-1).values
            _check(not bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()),
                   "extra_cols repeats a key within a row")
    for name, t in (("bias", bias), ("mask", mask)):
        if t is not None:
            _check(t.dim() >= 1 and broadcastable(tuple(t.shape), (B, Hq, Lq, Lk)),
                   f"{name} shape {tuple(t.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}")
    _check(bias is None or bias.is_floating_point(), "bias must be floating point", TypeError)
    _check(mask is None or mask.dtype == torch.bool, "mask must be bool (True = keep)", TypeError)
