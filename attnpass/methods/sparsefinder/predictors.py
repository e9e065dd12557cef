"""Sparsefinder's graph predictors (Treviso et al. 2022).

Sparsefinder projects each query and key to r dims (per query head: W_Q, W_K of shape (D, r)) and
predicts which (query, key) pairs entmax-1.5 will give a nonzero probability from the projected
points alone. Every predictor here returns (row, col) pairs over the R = B*Hq*Lq query rows
(r = (b*Hq + h)*Lq + i), never a Lq x Lk tensor; `predict_edges` unions and dedupes them into the
CSR that `attnpass.lowering.torch.edge_attention` reads.

Predictors (qp (B, H, Lq, r) and kp (B, H, Lk, r) are the projected queries / keys; GQA keys are
projected once per query head, with that head's W_K):

- distance: ||qp_i - kp_j|| < threshold. All pairs in r dims: O(Lq*Lk*r) FLOPs, done over chunks
  of query rows so the peak extra memory is O(chunk * Lk). Quadratic in time by nature.
- quantization: per projected dim, queries and real keys are sorted *separately* by their
  coordinate; keys are cut into buckets of `bucket_size` consecutive ranks (n_b = ceil(real keys /
  bucket_size) buckets), and query rank i goes to bucket floor(i * n_b / Lq): q and k buckets are
  aligned by quantile, so bucket t holds the same slice of the distribution on both sides (this is
  robust to W_Q and W_K placing queries and keys at different offsets, and it serves Lq != Lk).
  Edge if q and k share a bucket in any dim. O(r (Lq log Lq + Lk log Lk)) for the sorts plus at
  most r * Lq * bucket_size candidate pairs, produced as a fixed-width (rows, r * bucket_size)
  slot matrix and deduplicated by a sort along each row (`csr_from_slots`), not a global unique.
- clustering: k-means centroids (H, c, r) in the projected space; a token's clusters are its
  `top_clusters` nearest centroids (Euclidean); edge if q and k share one. O((Lq + Lk) c r) plus
  the candidate pairs.
- window: |anchor(i) - j| <= window, anchor(i) = i + causal_offset when causal, else
  floor(i * Lk / Lq) (the query's position in key space); first token: the edge (i, 0).

Causal pairs j > i + offset and padding keys are dropped here already (the kernel would drop them
too, but not generating them keeps the edge list small).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from attnpass.lowering.torch.common import csr_ptr
from attnpass.lowering.torch.edge_attention import edges_from_pairs
from attnpass.methods.base import key_anchor

PREDICTORS = ("distance", "quantization", "clustering")

# Rows of a chunk times Lk stay around this many elements (distance predictor, gold graph).
CHUNK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------


def project(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), w_q / w_k (Hq, D, r) -> qp (B, Hq, Lq, r), kp (B, Hq, Lk, r).

    Query head h projects the keys of kv head h // (Hq // Hkv) with its own W_K[h].

    Every token is projected by its own (1 x D) @ (D x r) product, the same kernel for each: equal
    tokens (a padded batch's padding, repeated text) get bit-equal projections, so they tie exactly
    in the predictors' sorts, as in onnxruntime. One (L x D) @ (D x r) matmul tiles its rows, and
    rows of different tiles can round differently (seen: 9e-16 apart in float64 on an AVX2 CPU),
    which breaks such a tie one way in PyTorch and another in ONNX.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    r = w_q.shape[-1]
    qp = torch.matmul(q.unsqueeze(-2), w_q.to(q.dtype).unsqueeze(1)).squeeze(-2)
    kp = torch.matmul(k[:, :, None, :, None, :], w_k.to(k.dtype).view(Hkv, Hq // Hkv, 1, D, r))  # (B, Hkv, g, Lk, 1, r)
    return qp, kp.reshape(B, Hq, Lk, r)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def expand_groups(query_group: Tensor, query_row: Tensor, key_group: Tensor, key_col: Tensor,
                   num_groups: int, on_pairs=None) -> tuple[Tensor, Tensor]:
    """Every (query row, key col) pair whose group ids match.

    query_group / query_row: one entry per (query, group) membership; key_group / key_col the same
    for keys (group ids in [0, num_groups)). Work and memory are O(memberships + pairs).
    `on_pairs(n)` is called with the pair count before the pairs are allocated (it may refuse).
    """
    order = torch.argsort(key_group, stable=True)
    sorted_col = key_col[order]
    counts = torch.bincount(key_group, minlength=num_groups)
    ptr = csr_ptr(counts)
    n = counts[query_group]
    total = int(n.sum())
    if on_pairs is not None:
        on_pairs(total)
    member = torch.repeat_interleave(torch.arange(query_group.numel(), device=n.device), n, output_size=total)
    first = torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]])
    within = torch.arange(total, device=n.device) - first[member]
    return query_row[member], sorted_col[ptr[query_group[member]] + within]


# --------------------------------------------------------------------------------------------
# Predictors: each returns (row, col) pairs, allowed by causal rule and padding, maybe repeated
# --------------------------------------------------------------------------------------------


def distance_pairs(qp: Tensor, kp: Tensor, threshold: float, *, causal: bool = False, causal_offset: int = 0,
                   key_keep: Tensor | None = None, on_pairs=None) -> tuple[Tensor, Tensor]:
    """||qp_i - kp_j|| < threshold, over chunks of query rows (O(Lq Lk r) FLOPs, O(chunk Lk) memory).
    `on_pairs(n)` is called with the pairs found so far after each chunk (it may refuse)."""
    B, H, Lq, r = qp.shape
    Lk = kp.shape[2]
    acc = torch.promote_types(qp.dtype, torch.float32)
    qp, kp = qp.to(acc), kp.to(acc)
    chunk = max(1, CHUNK_ELEMENTS // max(Lk, 1))
    k_sq = kp.square().sum(-1)  # (B, H, Lk)
    t2 = float(threshold) ** 2 if math.isfinite(threshold) else math.inf
    rows, cols, found = [], [], 0
    cols_all = torch.arange(Lk, device=qp.device)
    for b in range(B):
        keep = None if key_keep is None else key_keep[b]
        for h in range(H):
            base = (b * H + h) * Lq
            for i0 in range(0, Lq, chunk):
                i1 = min(i0 + chunk, Lq)
                qc = qp[b, h, i0:i1]
                d2 = qc.square().sum(-1, keepdim=True) + k_sq[b, h] - 2 * qc @ kp[b, h].T  # (chunk, Lk)
                hit = d2 < t2
                if causal:
                    hit &= cols_all <= torch.arange(i0, i1, device=qp.device).unsqueeze(-1) + causal_offset
                if keep is not None:
                    hit &= keep
                i, j = hit.nonzero(as_tuple=True)
                rows.append(base + i0 + i)
                cols.append(j)
                found += i.numel()
                if on_pairs is not None:
                    on_pairs(found)
    if not rows:
        empty = torch.zeros(0, dtype=torch.int64, device=qp.device)
        return empty, empty
    return torch.cat(rows), torch.cat(cols)


def quantization_orders(qp: Tensor, kp: Tensor, key_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per projected dim, query and key positions in coordinate order: q_order (B, H, r, Lq) and
    key_order (B, H, r, Lk), padding keys last (they never take a bucket). Ties: lower position first."""
    B, H, Lq, r = qp.shape
    Lk = kp.shape[2]
    kc = kp.transpose(-1, -2)  # (B, H, r, Lk)
    if key_keep is not None:
        kc = torch.where(key_keep.view(B, 1, 1, Lk), kc, torch.inf)
    return torch.argsort(qp.transpose(-1, -2), dim=-1, stable=True), torch.argsort(kc, dim=-1, stable=True)


def quantization_slots(qp: Tensor, kp: Tensor, bucket_size: int, *, causal: bool = False, causal_offset: int = 0,
                       key_keep: Tensor | None = None) -> Tensor:
    """Shared quantile bucket in any projected dim (see the module docstring for the alignment).

    Returns (B*H*Lq, r * bucket_size) key positions, one row per query row, -1 = no edge (repeats
    across dims are possible; `csr_from_slots` removes them).
    """
    B, H, Lq, r = qp.shape
    Lk = kp.shape[2]
    dev = qp.device
    if Lq == 0 or Lk == 0:
        return torch.full((B * H * Lq, 0), -1, dtype=torch.int64, device=dev)
    keep = torch.ones(B, Lk, dtype=torch.bool, device=dev) if key_keep is None else key_keep
    n_real = keep.sum(-1).view(B, 1, 1, 1)  # (B, 1, 1, 1)
    n_buckets = (n_real + bucket_size - 1) // bucket_size
    q_order, key_order = quantization_orders(qp, kp, key_keep)  # rank -> position
    q_rank = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(Lq, device=dev).expand_as(q_order))
    q_bucket = (q_rank * n_buckets // Lq).transpose(-1, -2)  # (B, H, Lq, r)
    # candidate slots: key ranks bucket*bs + s, s < bucket_size, that exist among the real keys
    slot = q_bucket.unsqueeze(-1) * bucket_size + torch.arange(bucket_size, device=dev)  # (B, H, Lq, r, bs)
    valid = slot < n_real.unsqueeze(-1)
    # gather from key_order (B, H, r, Lk) at [b, h, d, slot]
    flat = key_order.reshape(B * H * r, Lk)
    base = (torch.arange(B * H, device=dev).view(B, H, 1, 1, 1) * r + torch.arange(r, device=dev).view(1, 1, 1, r, 1)) * Lk
    col = flat.reshape(-1)[(base + slot.clamp(max=Lk - 1)).reshape(-1)].view(slot.shape)
    if causal:
        valid &= col <= torch.arange(Lq, device=dev).view(1, 1, Lq, 1, 1) + causal_offset
    return torch.where(valid, col, -1).view(B * H * Lq, r * bucket_size)


def quantization_pairs(qp: Tensor, kp: Tensor, bucket_size: int, **kwargs) -> tuple[Tensor, Tensor]:
    """`quantization_slots` as (row, col) pairs (repeats possible)."""
    return _slots_to_pairs(quantization_slots(qp, kp, bucket_size, **kwargs))


def _slots_to_pairs(slots: Tensor) -> tuple[Tensor, Tensor]:
    row = torch.arange(slots.shape[0], device=slots.device).unsqueeze(-1).expand_as(slots)
    ok = slots >= 0
    return row[ok], slots[ok]


def csr_from_slots(slots: Tensor) -> tuple[Tensor, Tensor]:
    """(R, W) key positions per row (-1 = none, repeats allowed) -> CSR (row_ptr, col_index), columns
    sorted and unique per row. A sort along each short row, not a global unique over all pairs."""
    cols = torch.where(slots >= 0, slots, torch.iinfo(torch.int64).max).sort(dim=-1).values
    keep = cols != torch.iinfo(torch.int64).max
    keep[:, 1:] &= cols[:, 1:] != cols[:, :-1]
    counts = keep.sum(-1)
    return csr_ptr(counts), cols[keep]


def nearest_clusters(x: Tensor, centroids: Tensor, top: int) -> Tensor:
    """x (B, H, L, r), centroids (H, c, r) -> (B, H, L, top) indices of the nearest centroids (Euclidean)."""
    mu = centroids.to(x.dtype)
    d2 = x.square().sum(-1, keepdim=True) + mu.square().sum(-1).unsqueeze(1) - 2 * torch.matmul(x, mu.transpose(-1, -2))
    # Exact ties (two identical centroids, e.g. both seeded from every row's [CLS] / zero pad token)
    # go to the lowest index: a defined rule, the one ONNX TopK has, so the ONNX export predicts the
    # same pairs (torch.topk's tie order is unspecified). Without ties it is topk's set.
    return d2.argsort(dim=-1, stable=True)[..., :top]


def clustering_pairs(qp: Tensor, kp: Tensor, centroids: Tensor, top_clusters: int, *, causal: bool = False,
                     causal_offset: int = 0, key_keep: Tensor | None = None, on_pairs=None) -> tuple[Tensor, Tensor]:
    """Edge if q and k share one of their `top_clusters` nearest centroids (pairs repeat when they share
    several). `on_pairs(n)`: see `expand_groups`."""
    B, H, Lq, r = qp.shape
    Lk = kp.shape[2]
    dev = qp.device
    c = centroids.shape[1]
    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1)
    q_group = (bh * c + nearest_clusters(qp, centroids, top_clusters)).reshape(-1)
    q_row = (bh * Lq + torch.arange(Lq, device=dev).view(1, 1, Lq, 1)).expand(B, H, Lq, top_clusters).reshape(-1)
    k_group = bh * c + nearest_clusters(kp, centroids, top_clusters)  # (B, H, Lk, top)
    k_col = torch.arange(Lk, device=dev).view(1, 1, Lk, 1).expand_as(k_group)
    if key_keep is not None:
        real = key_keep.view(B, 1, Lk, 1).expand_as(k_group)
        k_group, k_col = k_group[real], k_col[real]
    row, col = expand_groups(q_group, q_row, k_group.reshape(-1), k_col.reshape(-1), B * H * c, on_pairs)
    if causal:
        ok = col <= row % Lq + causal_offset
        row, col = row[ok], col[ok]
    return row, col


def window_slots(B: int, H: int, Lq: int, Lk: int, window: int | None, first_token: bool, *, causal: bool = False,
                 causal_offset: int = 0, key_keep: Tensor | None = None, device=None) -> Tensor:
    """|anchor(i) - j| <= window (None: no window edges), plus (i, 0) with first_token, as
    (B*H*Lq, W) key positions (-1 = none; each key at most once per row), only pairs the causal
    rule and key padding allow."""
    i = torch.arange(Lq, device=device)
    cols = []
    if window is not None and Lk > 0:
        low = -window
        high = 0 if causal else window  # causal: keys after the anchor are never allowed
        cols.append(key_anchor(i, Lq, Lk, causal, causal_offset).unsqueeze(-1) + torch.arange(low, high + 1, device=device))
    if first_token and Lk > 0:
        first = torch.zeros(Lq, 1, dtype=torch.int64, device=device)
        if cols:  # listed once: not again when the window already holds key 0
            first = torch.where((cols[0] == 0).any(-1, keepdim=True), -1, first)
        cols.append(first)
    if not cols:
        return torch.full((B * H * Lq, 0), -1, dtype=torch.int64, device=device)
    col = torch.cat(cols, dim=-1)  # (Lq, W)
    ok = (col >= 0) & (col < Lk)
    if causal:
        ok &= col <= i.unsqueeze(-1) + causal_offset
    col = torch.where(ok, col, -1).expand(B, H, Lq, col.shape[-1])
    if key_keep is not None:
        real = key_keep.gather(1, col.clamp(min=0).reshape(B, -1)).view(col.shape)
        col = torch.where(real, col, -1)
    return col.reshape(B * H * Lq, -1)


def window_pairs(B: int, H: int, Lq: int, Lk: int, window: int | None, first_token: bool, **kwargs) -> tuple[Tensor, Tensor]:
    """`window_slots` as (row, col) pairs."""
    return _slots_to_pairs(window_slots(B, H, Lq, Lk, window, first_token, **kwargs))


def predict_edges(qp: Tensor, kp: Tensor, predictor: str, *, threshold: float = 1.0, bucket_size: int = 16,
                  centroids: Tensor | None = None, top_clusters: int = 1, window: int | None = None,
                  first_token: bool = False, causal: bool = False, causal_offset: int = 0,
                  key_keep: Tensor | None = None, on_pairs=None) -> tuple[Tensor, Tensor, int]:
    """The predicted graph as CSR ``(row_ptr (B*H*Lq + 1,), col_index)`` (deduplicated, sorted per
    row) and the number of candidate pairs generated before deduplication (for the cost).
    `on_pairs(n)` is told the data-dependent predictors' pair count before it is allocated (it may
    refuse); the quantization predictor's is fixed by its shapes."""
    B, H, Lq, _ = qp.shape
    Lk = kp.shape[2]
    common = dict(causal=causal, causal_offset=causal_offset, key_keep=key_keep)
    with torch.no_grad():
        local = window_slots(B, H, Lq, Lk, window, first_token, device=qp.device, **common)
        if predictor == "quantization":
            # fixed width per row: dedupe with a sort along each row (no global unique)
            slots = torch.cat([quantization_slots(qp, kp, bucket_size, **common), local], dim=-1)
            row_ptr, col_index = csr_from_slots(slots)
            return row_ptr, col_index, int((slots >= 0).sum())
        if predictor == "distance":
            row, col = distance_pairs(qp, kp, threshold, on_pairs=on_pairs, **common)
        elif predictor == "clustering":
            if centroids is None:
                raise ValueError("predict_edges: predictor 'clustering' needs centroids")
            row, col = clustering_pairs(qp, kp, centroids, top_clusters, on_pairs=on_pairs, **common)
        else:
            raise ValueError(f"predict_edges: unknown predictor {predictor!r}; expected one of {list(PREDICTORS)}")
        w_row, w_col = _slots_to_pairs(local)
        row, col = torch.cat([row, w_row]), torch.cat([col, w_col])
        row_ptr, col_index = edges_from_pairs(row, col, B * H * Lq)
    return row_ptr, col_index, row.numel()


