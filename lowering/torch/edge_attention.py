"""Attention over a per-query, variable-size set of keys given as a CSR edge list.

SBM attention (sampled edges) and Sparsefinder (a predicted entmax graph) both produce, for every
query row, an arbitrary set of key positions. This kernel normalises each row over exactly its
edges and never materialises anything of size Lq x Lk.

Shapes::

    q           (B, Hq, Lq, D)       k (B, Hkv, Lk, D)     v (B, Hkv, Lk, Dv)     Hq % Hkv == 0
                                     (GQA: query head h reads key/value head h // (Hq // Hkv))
    row_ptr     (R + 1,) int64       CSR over the R = B*Hq*Lq query rows, r = (b*Hq + h)*Lq + i;
                                     nondecreasing, row_ptr[0] == 0, row_ptr[-1] == nnz
    col_index   (nnz,) int64         key position j in [0, Lk) of each edge, unique within a row
    key_padding_mask (B, Lk) bool    True = real key; edges to padding are dropped
    bias        broadcastable to (B, Hq, Lq, Lk); only read (gathered) at the edges
    edge_bias   (nnz,) float         an additive logit per edge, in col_index order (SBM's
                                     straight-through estimator reads its gradient: at weight
                                     A = 1, d loss / d A = d loss / d log A = d loss / d edge_bias)

    out         (B, Hq, Lq, Dv)      in q's dtype
    row_stat    (B, Hq, Lq)          softmax: logsumexp of the row's scores;
                                     entmax15: threshold tau with p = relu(score / 2 - tau) ** 2.
                                     0 for rows without allowed edges (whose output is 0).
                                     float32, or float64 when q is float64 (so float64 stays exact).

The score of edge e = (r, j) is ``scale * <q_r, k_j> + bias[b, h, i, j] + edge_bias[e]``. With
``causal``, edges with ``j > i + causal_offset`` are dropped (not an error), like edges to padding keys;
with a ``window`` w > 0 (a band) also edges at distance >= w from i + causal_offset (causal: j <= i + causal_offset - w).

Work is done on tiles: rows of similar degree (padded to the next power of two, so under half a
tile is padding), each row's key and value rows gathered into (rows, width, D) blocks, logits and
outputs as batched matmuls, the normalisers row by row along the width. A tile's size is bounded,
so peak memory is O(tile) on top of the O(nnz) index arrays and the outputs, whatever nnz is.
Each query row is read once per tile (not once per edge), which is what makes it fast on CPU.

``edge_attention`` is the public entry point; the core is the custom op
``attnpass::edge_attention`` (backward: ``attnpass::edge_attention_backward``), so it is one node
under torch.export / torch.compile. The backward recomputes the probabilities from q, k and the
saved row_stat and regenerates the dropout mask from the seed: the mask is a counter-based hash of
(seed, query row, key column), independent of chunking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attnpass.lowering.torch.common import broadcastable as _broadcastable
from attnpass.lowering.torch.common import as_4d, check, check_qkv, csr_ptr, csr_rows, dropout_keep, pair_index
from attnpass.lowering.torch.row_normalizers import NORMALIZERS
from attnpass.lowering.torch.row_normalizers import logits_grad as _logits_grad
from attnpass.lowering.torch.row_normalizers import probs_from_stat as _probs
from attnpass.lowering.torch.row_normalizers import row_stat as _row_stat
from attnpass.lowering.triton.switch import dispatching

__all__ = ["NORMALIZERS", "edge_attention", "edges_from_pairs", "edges_to_dense_mask"]


def _check(condition: bool, message: str, error: type = ValueError) -> None:
    check("edge_attention", condition, message, error)

# Sets the chunk size: edges per chunk = this / (2*D + 2*Dv + 8), so the gathered per-edge rows
# (q, k, v, grad-out, ...) of one chunk stay around this many elements. Forward and backward hold a
# few such tensors at once, so the extra peak memory is a small multiple of it, whatever nnz is.
_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_ptr: Tensor,
    col_index: Tensor,
    *,
    scale: float,
    causal: bool = False,
    causal_offset: int = 0,
    window: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    edge_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    normalizer: str = "softmax",
) -> tuple[Tensor, Tensor]:
    """Attention of each query row to exactly the keys listed for it in (row_ptr, col_index).

    Returns ``(out, row_stat)``; see the module docstring for shapes and semantics. Dropout acts on
    the normalised probabilities (inverted dropout, scaled by 1 / (1 - p)); its mask is a
    deterministic function of ``dropout_seed``, which is drawn from torch's global RNG when None
    and ``dropout_p > 0``.
    """
    if dropout_seed is None and isinstance(dropout_p, (int, float)) and dropout_p > 0:
        # Drawn here, not inside the op, so the op stays a pure function of its arguments and the
        # backward regenerates the very same mask.
        dropout_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return torch.ops.attnpass.edge_attention(
        q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias,
        scale=float(scale), causal=bool(causal), causal_offset=causal_offset, window=int(window),
        dropout_p=float(dropout_p), dropout_seed=dropout_seed, normalizer=normalizer,
    )


def edges_from_pairs(row: Tensor, col: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """CSR ``(row_ptr (num_rows + 1,), col_index (nnz,))`` from unsorted (row, col) pairs.

    Duplicate pairs are merged (SBM sampling draws multigraphs); columns come out sorted within
    each row.
    """
    _check_pairs(row, col, num_rows)
    if row.numel() == 0:
        return torch.zeros(num_rows + 1, dtype=torch.int64, device=row.device), col.new_empty(0)
    num_cols = int(col.max()) + 1
    if num_rows * num_cols >= 2**63:
        raise ValueError(f"edges_from_pairs: num_rows * (max col + 1) = {num_rows} * {num_cols} overflows int64")
    # One int64 key per pair orders by (row, col); unique() both sorts and removes duplicates.
    key = torch.unique(row * num_cols + col, sorted=True)
    row, col = key // num_cols, key % num_cols
    counts = torch.bincount(row, minlength=num_rows)
    return csr_ptr(counts), col


def edges_to_dense_mask(row_ptr: Tensor, col_index: Tensor, B: int, Hq: int, Lq: int, Lk: int) -> Tensor:
    """TEST / VISUALISATION HELPER ONLY: the (B, Hq, Lq, Lk) bool mask of the edge set.

    It builds the quadratic mask on purpose; never call it on a model's hot path.
    """
    R = B * Hq * Lq
    if row_ptr.numel() != R + 1:
        raise ValueError(f"edges_to_dense_mask: row_ptr has {row_ptr.numel()} entries, expected R + 1 = {R + 1}")
    rows = csr_rows(row_ptr)
    mask = torch.zeros(R, Lk, dtype=torch.bool, device=row_ptr.device)
    mask[rows, col_index] = True
    return mask.view(B, Hq, Lq, Lk)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_pairs(row: Tensor, col: Tensor, num_rows: int) -> None:
    for name, t in (("row", row), ("col", col)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64:
            raise TypeError(f"edges_from_pairs: {name} must be an int64 tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() != 1:
            raise ValueError(f"edges_from_pairs: {name} must be 1-D, got shape {tuple(t.shape)}")
    if row.numel() != col.numel():
        raise ValueError(f"edges_from_pairs: row has {row.numel()} entries but col has {col.numel()}")
    if not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"edges_from_pairs: num_rows must be a non-negative int, got {num_rows!r}")
    if row.numel() and (int(row.min()) < 0 or int(row.max()) >= num_rows):
        raise ValueError(f"edges_from_pairs: row values must lie in [0, {num_rows}), got "
                         f"[{int(row.min())}, {int(row.max())}]")
    if col.numel() and int(col.min()) < 0:
        raise ValueError(f"edges_from_pairs: col values must be >= 0, got min {int(col.min())}")


def check_inputs(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, scale, causal_offset,
                  dropout_p, dropout_seed, normalizer) -> None:
    """Checks on shapes, dtypes and settings only, so the fake (meta) kernel can run them too."""
    _check(normalizer in NORMALIZERS, f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    _check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p!r}")
    _check(dropout_p == 0 or dropout_seed is not None,
           "dropout_seed is required when dropout_p > 0 (the public wrapper draws one)")
    _check(math.isfinite(scale), f"scale must be finite, got {scale!r}")
    check_qkv("edge_attention", q, k, v)
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape

    for name, t in (("row_ptr", row_ptr), ("col_index", col_index)):
        _check(t.dtype == torch.int64, f"{name} must be int64, got {t.dtype}", TypeError)
        _check(t.dim() == 1, f"{name} must be 1-D, got shape {tuple(t.shape)}")
        _check(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    R = B * Hq * Lq
    _check(row_ptr.shape[0] == R + 1,
           f"row_ptr must have B*Hq*Lq + 1 = {R + 1} entries (one row per query), got {row_ptr.shape[0]}")

    if key_padding_mask is not None:
        _check(key_padding_mask.dtype == torch.bool,
               f"key_padding_mask must be bool (True = real key), got {key_padding_mask.dtype}", TypeError)
        _check(tuple(key_padding_mask.shape) == (B, Lk),
               f"key_padding_mask must be (B={B}, Lk={Lk}), got shape {tuple(key_padding_mask.shape)}")
        _check(key_padding_mask.device == q.device, f"key_padding_mask is on {key_padding_mask.device}")
    if bias is not None:
        _check(bias.is_floating_point(), f"bias must be floating point, got {bias.dtype}", TypeError)
        _check(bias.dim() >= 1 and _broadcastable(tuple(bias.shape), (B, Hq, Lq, Lk)),
               f"bias shape {tuple(bias.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}")
        _check(bias.device == q.device, f"bias is on {bias.device} but q is on {q.device}")
    if edge_bias is not None:
        _check(edge_bias.is_floating_point(), f"edge_bias must be floating point, got {edge_bias.dtype}", TypeError)
        _check(tuple(edge_bias.shape) == tuple(col_index.shape),
               f"edge_bias must have one entry per edge, shape {tuple(col_index.shape)}, got {tuple(edge_bias.shape)}")
        _check(edge_bias.device == q.device, f"edge_bias is on {edge_bias.device} but q is on {q.device}")


def check_edges(row_ptr: Tensor, col_index: Tensor, Lk: int) -> Tensor:
    """Value checks on the CSR (real tensors only: they read the data). Returns each edge's row."""
    nnz = col_index.numel()
    _check(int(row_ptr[0]) == 0, f"row_ptr[0] must be 0, got {int(row_ptr[0])}")
    _check(int(row_ptr[-1]) == nnz, f"row_ptr[-1] must equal len(col_index) = {nnz}, got {int(row_ptr[-1])}")
    _check(bool((row_ptr.diff() >= 0).all()), "row_ptr must be nondecreasing")
    rows = csr_rows(row_ptr, nnz)
    if nnz == 0:
        return rows
    lo, hi = int(col_index.min()), int(col_index.max())
    _check(lo >= 0 and hi < Lk, f"col_index values must lie in [0, Lk={Lk}), got [{lo}, {hi}]")
    # Unique within a row <=> the (row, col) keys have no repeats. Rows are already grouped, so
    # strictly increasing keys (columns sorted per row, as edges_from_pairs makes them) settle it
    # without sorting.
    key = rows * Lk + col_index
    if not bool((key.diff() > 0).all()):
        _check(bool((key.sort().values.diff() > 0).all()),
               "col_index has a repeated key within a row (build the CSR with edges_from_pairs to dedupe)")
    return rows


# --------------------------------------------------------------------------------------------
# Edges: the allowed edge set in CSR order and the chunks of whole rows that cover it
# --------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """Validated inputs, flattened to row spaces, plus the settings; shared by forward and backward."""

    q2: Tensor              # (B*Hq*Lq, D)   query row r
    k2: Tensor              # (B*Hkv*Lk, D)  key row (b*Hkv + g)*Lk + j
    v2: Tensor              # (B*Hkv*Lk, Dv)
    bias4: Optional[Tensor]  # bias viewed with 4 dims (leading size-1 dims added), never expanded
    edge_bias: Optional[Tensor]  # (n,) per allowed edge
    edge_id: Optional[Tensor]    # (n,) position of each allowed edge in the caller's col_index (None: all kept)
    dims: tuple             # (B, Hq, Hkv, Lq, Lk, D, Dv)
    row_ptr: Tensor         # (R + 1,) CSR over the ALLOWED edges
    col: Tensor             # (n,) key position of each allowed edge
    scale: float
    dropout_p: float
    dropout_seed: Optional[int]
    normalizer: str
    acc: torch.dtype

    def row_groups(self) -> list[tuple[Tensor, int]]:
        """(rows, width) groups covering every row that has edges, each row exactly once.

        A row of degree d goes to width W = the next power of two >= d, so padding stays under
        half of a tile; rows of one width are cut into groups of at most
        _CHUNK_ELEMENTS / (W * (D + Dv + 4)) rows, which bounds the gathered (rows, W, D) key and
        value tiles whatever nnz is. Rows keep their order inside a group.
        """
        D, Dv = self.dims[5], self.dims[6]
        degree = self.row_ptr.diff()
        rows = degree.nonzero().squeeze(1)
        if rows.numel() == 0:
            return []
        d = degree.index_select(0, rows)
        exponent = torch.ceil(torch.log2(d.to(torch.float64))).long()
        exponent = exponent + (torch.pow(2, exponent) < d).long()  # guard log2 rounding
        exponent, order = torch.sort(exponent, stable=True)
        rows = rows.index_select(0, order)
        groups, start = [], 0
        values, counts = torch.unique_consecutive(exponent, return_counts=True)
        for e, count in zip(values.tolist(), counts.tolist()):
            width = 1 << e
            per = max(1, _CHUNK_ELEMENTS // (width * (D + Dv + 4)))
            groups += [(rows[s0:min(s0 + per, start + count)], width) for s0 in range(start, start + count, per)]
            start += count
        return groups


def _problem(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, *, scale, causal, causal_offset, window,
             dropout_p, dropout_seed, normalizer, validate: bool = True) -> _Problem:
    """Validate (the backward skips the data checks the forward already did) and prepare."""
    check_inputs(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, scale, causal_offset,
                  dropout_p, dropout_seed, normalizer)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if validate:
        row = check_edges(row_ptr, col_index, Lk)
    elif causal or window or key_padding_mask is not None:
        row = csr_rows(row_ptr, col_index.numel())  # the rules below need each edge's row; tiles do not

    # Drop disallowed edges once, up front: afterwards every edge is live, so no -inf logits from
    # masking and no special cases in the normalisers. Filtering keeps the order, so it is CSR again.
    col = col_index
    keep = None
    if causal:
        keep = col <= row % Lq + causal_offset
    if window:  # a band: keys at distance < window (causal: before the query only)
        distance = col - (row % Lq + causal_offset)
        near = (distance > -window) if causal else (distance.abs() < window)
        keep = near if keep is None else keep & near
    if key_padding_mask is not None:
        real = key_padding_mask.reshape(-1)[(row // (Hq * Lq)) * Lk + col]
        keep = real if keep is None else keep & real
    edge_id = None
    if keep is not None:
        row, col = row[keep], col[keep]
        row_ptr = csr_ptr(torch.bincount(row, minlength=B * Hq * Lq))
        if edge_bias is not None:
            edge_id = keep.nonzero().squeeze(1)
            edge_bias = edge_bias[edge_id]

    bias4 = None if bias is None else as_4d(bias)
    return _Problem(
        q2=q.reshape(B * Hq * Lq, D), k2=k.reshape(B * Hkv * Lk, D), v2=v.reshape(B * Hkv * Lk, Dv),
        bias4=bias4, edge_bias=edge_bias, edge_id=edge_id, dims=(B, Hq, Hkv, Lq, Lk, D, Dv),
        row_ptr=row_ptr, col=col,
        scale=float(scale), dropout_p=float(dropout_p), dropout_seed=dropout_seed, normalizer=normalizer,
        # float32 accumulation for half types; float64 inputs stay float64 (exact tests, gradcheck).
        acc=torch.float64 if q.dtype == torch.float64 else torch.float32,
    )


# --------------------------------------------------------------------------------------------
# One tile: a group of rows, each row's edges padded to the tile's width
# --------------------------------------------------------------------------------------------


@dataclass
class _Tile:
    rows: Tensor       # (n,) global query rows (each row is in exactly one tile)
    valid: Tensor      # (n, W) bool: the slot holds an edge (the rest is padding)
    edge: Tensor       # (n, W) the slot's position among the allowed edges (padding: the row's first edge)
    kv_row: Tensor     # (n, W) key/value row of the slot
    q: Tensor          # (n, D)     acc dtype
    k: Tensor          # (n, W, D)
    logits: Tensor     # (n, W), -inf on padding
    keep: Optional[Tensor]       # (n, W) inverted-dropout multiplier, None without dropout
    bias_index: Optional[tuple]  # index tuple into bias4 for every slot (gather / scatter)


def _tile_values(p: _Problem, t: _Tile) -> Tensor:
    """(n, W, Dv) value rows of a tile's slots (gathered only where they are all needed)."""
    n, width = t.kv_row.shape
    return p.v2.index_select(0, t.kv_row.reshape(-1)).view(n, width, -1).to(p.acc)


def _weighted_values(p: _Problem, t: _Tile, probs: Tensor) -> Tensor:
    """(n, Dv) = sum over each row's slots of probs * v.

    entmax-1.5 puts exact zeros on most slots, so when under a quarter of them carry mass only
    those value rows are gathered (index_select of the support, index_add into the rows): this
    halves the forward's memory traffic on sparse rows. Otherwise one batched matmul.
    """
    support = probs != 0
    count = int(support.sum())
    if count * 4 >= probs.numel():
        return torch.bmm(probs.unsqueeze(1), _tile_values(p, t)).squeeze(1)
    local_row, slot = support.nonzero().unbind(1)
    values = p.v2.index_select(0, t.kv_row[local_row, slot]).to(p.acc)
    out = torch.zeros(probs.shape[0], values.shape[1], dtype=p.acc, device=probs.device)
    return out.index_add_(0, local_row, probs[local_row, slot].unsqueeze(1) * values)


def _tile(p: _Problem, rows: Tensor, width: int) -> _Tile:
    B, Hq, Hkv, Lq, Lk, D, Dv = p.dims
    n = rows.numel()
    first = p.row_ptr.index_select(0, rows)
    degree = p.row_ptr.index_select(0, rows + 1) - first
    slot = torch.arange(width, device=rows.device)
    valid = slot < degree.unsqueeze(1)
    edge = torch.where(valid, first.unsqueeze(1) + slot, first.unsqueeze(1))
    col = p.col[edge]
    bh, i = rows // Lq, rows % Lq
    b, h = bh // Hq, bh % Hq
    kv_row = ((b * Hkv + h // (Hq // Hkv)) * Lk).unsqueeze(1) + col  # GQA: head h reads kv head h // group
    # index_select, then upcast: only the gathered rows are copied (bf16 dot products lose ~3 digits)
    flat = kv_row.reshape(-1)
    q_t = p.q2.index_select(0, rows).to(p.acc)
    k_t = p.k2.index_select(0, flat).view(n, width, D).to(p.acc)
    logits = torch.bmm(k_t, q_t.unsqueeze(-1)).squeeze(-1) * p.scale
    bias_index = None
    if p.bias4 is not None:
        coords = tuple(x.unsqueeze(1).expand(n, width) for x in (b, h, i)) + (col,)
        bias_index = pair_index(p.bias4.shape, coords)
        logits = logits + p.bias4[bias_index].to(p.acc)
    if p.edge_bias is not None:
        logits = logits + p.edge_bias[edge].to(p.acc)
    logits = logits.masked_fill(~valid, -math.inf)
    keep = None
    if p.dropout_p > 0:
        # the same pair coordinates as the other kernels: the mask does not depend on tiling
        keep = dropout_keep(p.dropout_seed, p.dropout_p, (bh.unsqueeze(1), i.unsqueeze(1), col), p.acc)
    return _Tile(rows=rows, valid=valid, edge=edge, kv_row=kv_row, q=q_t, k=k_t, logits=logits,
                 keep=keep, bias_index=bias_index)


# --------------------------------------------------------------------------------------------
# Forward and backward over tiles
# --------------------------------------------------------------------------------------------


def forward_torch(
    q: Tensor, k: Tensor, v: Tensor, row_ptr: Tensor, col_index: Tensor,
    key_padding_mask: Optional[Tensor], bias: Optional[Tensor], edge_bias: Optional[Tensor] = None,
    *, scale: float, causal: bool, causal_offset: int, window: int = 0, dropout_p: float,
    dropout_seed: Optional[int], normalizer: str,
) -> tuple[Tensor, Tensor]:
    p = _problem(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, scale=scale, causal=causal,
                 causal_offset=causal_offset, window=window, dropout_p=dropout_p, dropout_seed=dropout_seed,
                 normalizer=normalizer)
    B, Hq, Hkv, Lq, Lk, D, Dv = p.dims
    out = torch.zeros(B * Hq * Lq, Dv, dtype=p.acc, device=q.device)  # empty rows stay 0
    row_stat = torch.zeros(B * Hq * Lq, dtype=p.acc, device=q.device)
    for rows, width in p.row_groups():
        t = _tile(p, rows, width)
        stat = _row_stat(t.logits, normalizer)
        probs = _probs(t.logits, stat, normalizer)
        if t.keep is not None:
            probs = probs * t.keep
        out.index_copy_(0, rows, _weighted_values(p, t, probs))
        row_stat.index_copy_(0, rows, stat)
    return out.view(B, Hq, Lq, Dv).to(q.dtype), row_stat.view(B, Hq, Lq)


def backward_torch(
    grad_out: Tensor, grad_stat: Optional[Tensor], row_stat: Tensor,
    q: Tensor, k: Tensor, v: Tensor, row_ptr: Tensor, col_index: Tensor,
    key_padding_mask: Optional[Tensor], bias: Optional[Tensor], edge_bias: Optional[Tensor],
    *, scale: float, causal: bool, causal_offset: int, window: int = 0, dropout_p: float,
    dropout_seed: Optional[int], normalizer: str, bias_grad: bool, edge_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias, dedge_bias); the last two are 0-element tensors unless asked for."""
    p = _problem(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, scale=scale, causal=causal,
                 causal_offset=causal_offset, window=window, dropout_p=dropout_p, dropout_seed=dropout_seed,
                 normalizer=normalizer, validate=False)
    B, Hq, Hkv, Lq, Lk, D, Dv = p.dims
    acc = p.acc
    g_out = grad_out.reshape(B * Hq * Lq, Dv)
    g_stat = None if grad_stat is None else grad_stat.reshape(-1).to(acc)
    stat_all = row_stat.reshape(-1).to(acc)
    dq = torch.zeros_like(p.q2, dtype=acc)
    dk = torch.zeros_like(p.k2, dtype=acc)
    dv = torch.zeros_like(p.v2, dtype=acc)
    bias_grad = bias_grad and bias is not None
    dbias = torch.zeros(p.bias4.shape, dtype=acc, device=q.device) if bias_grad else None
    edge_bias_grad = edge_bias_grad and edge_bias is not None
    # edges the causal/padding rules dropped get no gradient: they took no part in the output
    dedge = torch.zeros(col_index.shape, dtype=acc, device=q.device) if edge_bias_grad else None

    for rows, width in p.row_groups():
        t = _tile(p, rows, width)
        stat = stat_all.index_select(0, rows)
        probs = _probs(t.logits, stat, normalizer)
        dropped = probs if t.keep is None else probs * t.keep
        d_o = g_out.index_select(0, rows).to(acc)  # (n, Dv)
        flat = t.kv_row.reshape(-1)
        # out_r = sum_slots dropped * v; padding slots add exact zeros to a real row
        dv.index_add_(0, flat, (dropped.unsqueeze(-1) * d_o.unsqueeze(1)).reshape(-1, Dv))
        d_probs = torch.bmm(_tile_values(p, t), d_o.unsqueeze(-1)).squeeze(-1)
        if t.keep is not None:
            d_probs = d_probs * t.keep
        d_stat = None if g_stat is None else g_stat.index_select(0, rows)
        d_logits = _logits_grad(t.logits, stat, probs, d_probs, d_stat, normalizer)
        # logits = scale * <q_row, k_slot> + bias; GQA heads sharing a kv head add up in dk
        d_scaled = d_logits * p.scale
        dq.index_copy_(0, rows, torch.bmm(d_scaled.unsqueeze(1), t.k).squeeze(1))
        dk.index_add_(0, flat, (d_scaled.unsqueeze(-1) * t.q.unsqueeze(1)).reshape(-1, D))
        if bias_grad:
            # accumulate=True also sums over bias's broadcast dims (they all index 0).
            dbias.index_put_(tuple(ix[t.valid] for ix in t.bias_index), d_logits[t.valid], accumulate=True)
        if edge_bias_grad:
            edge = t.edge[t.valid]
            dedge[edge if p.edge_id is None else p.edge_id[edge]] = d_logits[t.valid]

    # Custom ops cannot return None; a fresh 0-element tensor stands for "not computed".
    return (
        dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
        dbias.view(bias.shape).to(bias.dtype) if bias_grad else q.new_empty(0),
        dedge.to(edge_bias.dtype) if edge_bias_grad else q.new_empty(0),
    )


# --------------------------------------------------------------------------------------------
# Custom ops, fake (meta) kernels and autograd
# --------------------------------------------------------------------------------------------

# The ops run the PyTorch implementations or the Triton kernels (lowering/triton/switch.py decides)
_edge_attention_op = torch.library.custom_op(
    "attnpass::edge_attention", dispatching(forward_torch, "edge_forward"), mutates_args=())
_edge_attention_backward_op = torch.library.custom_op(
    "attnpass::edge_attention_backward", dispatching(backward_torch, "edge_backward"), mutates_args=()
)


def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_edge_attention_op.register_fake
def _forward_fake(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias=None, *, scale, causal,
                  causal_offset, window=0, dropout_p, dropout_seed, normalizer):
    # Output shapes do not depend on nnz, so no data-dependent sizes arise under tracing.
    check_inputs(q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, scale, causal_offset,
                  dropout_p, dropout_seed, normalizer)
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[3])), q.new_empty((B, Hq, Lq), dtype=_acc_dtype(q))


@_edge_attention_backward_op.register_fake
def _backward_fake(grad_out, grad_stat, row_stat, q, k, v, row_ptr, col_index, key_padding_mask, bias,
                   edge_bias, *, scale, causal, causal_offset, window=0, dropout_p, dropout_seed, normalizer, bias_grad,
                   edge_bias_grad):
    return (
        q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
        bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0),
        edge_bias.new_empty(edge_bias.shape) if edge_bias_grad and edge_bias is not None else q.new_empty(0),
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.settings = dict(keyword_only_inputs)


def _backward(ctx, grad_out, grad_stat):
    q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias, row_stat = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,)  # edge_bias may have been left out (its default)
    dq, dk, dv, dbias, dedge = _edge_attention_backward_op(
        grad_out, grad_stat, row_stat, q, k, v, row_ptr, col_index, key_padding_mask, bias, edge_bias,
        **ctx.settings, bias_grad=bool(needs[6]), edge_bias_grad=bool(needs[7]),
    )
    return (
        dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
        None, None, None, dbias if needs[6] else None, dedge if needs[7] else None,
    )[:len(ctx.needs_input_grad)]


_edge_attention_op.register_autograd(_backward, setup_context=_setup_context)
