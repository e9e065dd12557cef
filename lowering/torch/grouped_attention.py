"""Grouped (block-sparse) attention over gathered token groups, with optional shared summary keys.

One kernel family serves routing attention (groups = k-means clusters), Combiner (groups = fixed
regions, summaries = region summaries) and block-form Sparsefinder.

Shapes::

    q              (B, Hq, Lq, D)          k (B, Hkv, Lk, D)    v (B, Hkv, Lk, Dv)    Hq % Hkv == 0
    q_index        (B, Hq, G, Wq) int64    original query positions of group g; negative = empty slot
    k_index        (B, Hq, G, Wk) int64    original key positions visible to group g; negative = empty
    key_padding_mask (B, Lk) bool          True = real key
    bias           broadcastable to (B, Hq, Lq, Lk), read only at the pairs the groups define
    summary_k / _v (B, Hq, G, S, D / Dv)   extra keys/values visible to group g's query slots
    summary_mask   bool, broadcastable to (B, Hq, G, Wq, S)
    pair_mask      bool, broadcastable to (B, Hq, Lq, Lk), True = pair allowed; read only at the pairs
                   the groups define (like bias)
    key_range      (B, Hq, G, Wq, 2) int64: query slot (g, w) sees only keys at positions in
                   [key_range[..., 0], key_range[..., 1]] (per-query windows over a group's shared keys)

    out_slots      (B, Hq, G, Wq, Dv)      in q's dtype
    row_stat       (B, Hq, G, Wq)          logsumexp (softmax) or threshold tau (entmax15); 0 for
                                           empty rows. float32 (float64 when q is float64)

Every query slot is normalised ONCE over its allowed direct keys and its allowed summaries (a key
listed twice in one group counts twice, so callers keep a group's key slots distinct). Work is
done on tiles of a few groups at a time, (B, Hq, groups_in_chunk, Wq, Wk + S), so nothing of size
Lq x Lk is ever built. The backward pass recomputes the probabilities from q, k and row_stat
(flash-attention style) and regenerates the dropout mask from the seed, which is a counter-based
hash of (seed, batch*head, query position, key column), so it does not depend on chunking.

`grouped_attention` is the public entry point; the core is the custom op
``attnpass::grouped_attention`` (backward: ``attnpass::grouped_attention_backward``), so it stays a
single node under torch.export / torch.compile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from attnpass.lowering.torch.common import broadcastable as _broadcastable
from attnpass.lowering.torch.common import as_4d, check, check_qkv, dropout_keep, pair_index, read_at_pairs
from attnpass.lowering.torch.row_normalizers import NORMALIZERS, entmax15_stat, flushed_exp_, logits_grad, probs_from_stat
from attnpass.lowering.triton.switch import dispatching

__all__ = ["backward_torch", "check_inputs", "forward_torch", "grouped_attention", "output_shapes", "scatter_slots"]


def _check(condition: bool, message: str, error: type = ValueError) -> None:
    check("grouped_attention", condition, message, error)

# Upper bound (in elements) on one tile of logits plus its gathered q/k/v. Bounds peak memory
# independently of the number of groups; several tiles of this size are alive at once.
_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_index: Tensor,
    k_index: Tensor,
    *,
    scale: float,
    causal: bool = False,
    causal_offset: int = 0, window: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    summary_k: Optional[Tensor] = None,
    summary_v: Optional[Tensor] = None,
    summary_mask: Optional[Tensor] = None,
    pair_mask: Optional[Tensor] = None,
    key_range: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    normalizer: str = "softmax",
) -> tuple[Tensor, Tensor]:
    """Attention of each group's query slots to the group's key slots plus its summary keys.

    Returns ``(out_slots, row_stat)``; see the module docstring for shapes. When causal, pair
    (i, j) of ORIGINAL positions is allowed only if ``j <= i + causal_offset``. A ``window`` w > 0 is a
    band (a sliding window): only keys at distance < w from i + causal_offset, i.e. when causal
    ``j > i + causal_offset - w``, otherwise ``|j - i - causal_offset| < w``. Dropout acts on the
    normalised probabilities (inverted dropout); its mask is a deterministic function of
    ``dropout_seed``, drawn from torch's global RNG when None and ``dropout_p > 0``.
    """
    if dropout_seed is None and isinstance(dropout_p, (int, float)) and dropout_p > 0:
        # Drawn here rather than in the op so the op stays a pure function of its arguments
        # (the backward must regenerate exactly the same mask).
        dropout_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return torch.ops.attnpass.grouped_attention(
        q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask, pair_mask,
        key_range, scale=scale, causal=causal, causal_offset=causal_offset, window=window, dropout_p=dropout_p,
        dropout_seed=dropout_seed, normalizer=normalizer,
    )


def scatter_slots(out_slots: Tensor, q_index: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Average each token's outputs over the groups it appears in.

    Returns ``(out (B, Hq, length, Dv), count (B, Hq, length) int64)``. Tokens in no group get zeros
    and count 0 (routing may put a token in several clusters or in none).
    """
    if out_slots.dim() != 5:
        raise ValueError(f"out_slots must be (B, Hq, G, Wq, Dv), got shape {tuple(out_slots.shape)}")
    if q_index.dtype != torch.int64:
        raise TypeError(f"q_index must be int64, got {q_index.dtype}")
    if tuple(q_index.shape) != tuple(out_slots.shape[:4]):
        raise ValueError(
            f"q_index shape {tuple(q_index.shape)} must equal out_slots.shape[:4] "
            f"{tuple(out_slots.shape[:4])}"
        )
    B, H, G, W, Dv = out_slots.shape
    n_rows = B * H * length
    valid = q_index >= 0
    # Flat rows (b*H + h)*length + i and index_add_: much faster on CPU than scatter_add with an
    # index expanded over Dv. Empty slots point at a real row with weight 0.
    rows = ((torch.arange(B * H, device=q_index.device).view(B, H, 1, 1) * length) + q_index.clamp(min=0)).reshape(-1)
    count = torch.zeros(n_rows, dtype=torch.int64, device=q_index.device).index_add_(
        0, rows, valid.reshape(-1).to(torch.int64)).view(B, H, length)
    # Sum in at least float32 so bf16 outputs are not rounded twice.
    acc = torch.promote_types(out_slots.dtype, torch.float32)
    # Each slot is weighted by 1 / (its token's count) before the sum (0 for empty slots): one
    # multiply over the slots replaces a mask multiply plus a divide over the output, forward and
    # backward alike. No data-dependent branch: it must trace.
    weight = valid.to(acc) / count.view(-1).clamp(min=1).index_select(0, rows).view(valid.shape)
    out = torch.zeros((n_rows, Dv), dtype=acc, device=out_slots.device).index_add_(
        # (flattened before the split: merging symbolic dims in one view leaves unprovable guards)
        0, rows, (out_slots.to(acc) * weight.unsqueeze(-1)).reshape(-1).view(-1, Dv)).view(B, H, length, Dv)
    return out.to(out_slots.dtype), count


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_inputs(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v,
              summary_mask, pair_mask, key_range, scale, causal_offset, dropout_p, dropout_seed,
              normalizer) -> None:
    _check(normalizer in NORMALIZERS, f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    _check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0,
           f"dropout_p must be in [0, 1), got {dropout_p!r}")
    _check(dropout_p == 0 or dropout_seed is not None,
           "dropout_seed is required when dropout_p > 0 (the public wrapper draws one)")
    _check(isinstance(scale, (int, float)) and math.isfinite(scale), f"scale must be a finite float, got {scale!r}")
    _check(isinstance(causal_offset, (int, torch.SymInt)), f"causal_offset must be an int, got {causal_offset!r}", TypeError)
    check_qkv("grouped_attention", q, k, v)
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    Dv = v.shape[3]

    for name, idx in (("q_index", q_index), ("k_index", k_index)):
        _check(idx.dtype == torch.int64, f"{name} must be int64, got {idx.dtype}", TypeError)
        _check(idx.dim() == 4 and idx.shape[0] == B and idx.shape[1] == Hq,
               f"{name} must be (B={B}, Hq={Hq}, G, W), got shape {tuple(idx.shape)}")
        _check(idx.device == q.device, f"{name} is on {idx.device} but q is on {q.device}")
    G, Wq = q_index.shape[2], q_index.shape[3]
    _check(k_index.shape[2] == G, f"q_index has G={G} groups but k_index has {k_index.shape[2]}")

    if key_padding_mask is not None:
        _check(key_padding_mask.dtype == torch.bool,
               f"key_padding_mask must be bool (True = real key), got {key_padding_mask.dtype}", TypeError)
        _check(tuple(key_padding_mask.shape) == (B, Lk),
               f"key_padding_mask must be (B={B}, Lk={Lk}), got shape {tuple(key_padding_mask.shape)}")
    if bias is not None:
        _check(bias.is_floating_point(), f"bias must be floating point, got {bias.dtype}", TypeError)
        _check(1 <= bias.dim() and _broadcastable(tuple(bias.shape), (B, Hq, Lq, Lk)),
               f"bias shape {tuple(bias.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}")
    if pair_mask is not None:
        _check(pair_mask.dtype == torch.bool, f"pair_mask must be bool (True = allowed), got {pair_mask.dtype}", TypeError)
        _check(1 <= pair_mask.dim() and _broadcastable(tuple(pair_mask.shape), (B, Hq, Lq, Lk)),
               f"pair_mask shape {tuple(pair_mask.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}")

    if key_range is not None:
        _check(key_range.dtype == torch.int64, f"key_range must be int64, got {key_range.dtype}", TypeError)
        _check(tuple(key_range.shape) == (B, Hq, G, Wq, 2),
               f"key_range must be (B, Hq, G, Wq, 2) = {(B, Hq, G, Wq, 2)}, got shape {tuple(key_range.shape)}")
    _check((summary_k is None) == (summary_v is None), "summary_k and summary_v must be given together")
    if summary_k is None:
        _check(summary_mask is None, "summary_mask given without summary_k / summary_v")
        return
    _check(summary_k.dim() == 5 and tuple(summary_k.shape[:3]) == (B, Hq, G) and summary_k.shape[4] == D,
           f"summary_k must be (B={B}, Hq={Hq}, G={G}, S, D={D}), got shape {tuple(summary_k.shape)}")
    S = summary_k.shape[3]
    _check(tuple(summary_v.shape) == (B, Hq, G, S, Dv),
           f"summary_v must be (B, Hq, G, S, Dv) = {(B, Hq, G, S, Dv)}, got shape {tuple(summary_v.shape)}")
    for name, t in (("summary_k", summary_k), ("summary_v", summary_v)):
        _check(t.is_floating_point(), f"{name} must be floating point, got {t.dtype}", TypeError)
    if summary_mask is not None:
        _check(summary_mask.dtype == torch.bool, f"summary_mask must be bool, got {summary_mask.dtype}", TypeError)
        _check(_broadcastable(tuple(summary_mask.shape), (B, Hq, G, Wq, S)),
               f"summary_mask shape {tuple(summary_mask.shape)} is not broadcastable to "
               f"(B, Hq, G, Wq, S) = {(B, Hq, G, Wq, S)}")


# --------------------------------------------------------------------------------------------
# Tiles: everything one chunk of groups needs, gathered from the full tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """Validated inputs plus settings, and the flattened views both passes gather from."""

    q: Tensor
    k: Tensor
    v: Tensor
    q_index: Tensor
    k_index: Tensor
    key_padding_mask: Optional[Tensor]
    bias: Optional[Tensor]
    summary_k: Optional[Tensor]
    summary_v: Optional[Tensor]
    summary_mask: Optional[Tensor]
    pair_mask: Optional[Tensor]
    key_range: Optional[Tensor]
    scale: float
    causal: bool
    causal_offset: int
    window: int  # a band: |j - (i + causal_offset)| < window, causal: j > i + causal_offset - window (0: none)
    dropout_p: float
    dropout_seed: Optional[int]
    normalizer: str

    def __post_init__(self):
        B, Hq, _, D = self.q.shape
        dev = self.q.device
        self.b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        self.h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
        self.kv_h = self.h // (Hq // self.k.shape[1])  # GQA: query head h reads kv head h // group
        # Row-major (B*H*L, D) views: index_select on rows is much faster than 3-index advanced
        # indexing. reshape copies only if the caller's tensor is not already row-contiguous.
        self.q_rows = self.q.reshape(-1, D)
        self.k_rows = self.k.reshape(-1, D)
        self.v_rows = self.v.reshape(-1, self.v.shape[3])

    @property
    def acc(self) -> torch.dtype:
        return _acc_dtype(self.q)

    @property
    def num_summaries(self) -> int:
        return 0 if self.summary_k is None else self.summary_k.shape[3]

    def chunks(self):
        """Group ranges [g0, g1) sized so one tile stays under _CHUNK_ELEMENTS."""
        B, Hq, G, Wq = self.q_index.shape
        Wk, S = self.k_index.shape[3], self.num_summaries
        D, Dv = self.q.shape[3], self.v.shape[3]
        per_group = max(1, B * Hq * (Wq * (Wk + S) + (Wq + Wk + S) * (D + Dv)))
        step = max(1, _CHUNK_ELEMENTS // per_group)
        return [(g0, min(G, g0 + step)) for g0 in range(0, G, step)]


@dataclass
class _Tile:
    q: Tensor            # (B, Hq, c, Wq, D)       acc dtype
    k: Tensor            # (B, Hq, c, Wk, D)       acc dtype
    v: Tensor            # (B, Hq, c, Wk, Dv)      acc dtype
    summary_k: Optional[Tensor]  # (B, Hq, c, S, D) acc dtype
    summary_v: Optional[Tensor]  # (B, Hq, c, S, Dv)
    keys: Tensor         # (B, Hq, c, Wk + S, D)   [k; summary_k] (k itself when no summaries)
    values: Tensor       # (B, Hq, c, Wk + S, Dv)  [v; summary_v]
    logits: Tensor       # (B, Hq, c, Wq, Wk + S)  -inf where the pair is not allowed
    keep: Optional[Tensor]  # same shape: 0 or 1/(1-p) per pair (inverted dropout), None without dropout
    q_row: Tensor        # (B, Hq, c, Wq) row of each query slot in p.q_rows (empty slots: a valid dummy)
    k_row: Tensor        # (B, Hq, c, Wk) row of each key slot in p.k_rows / p.v_rows
    bias_index: Optional[tuple]  # index tuple into as_4d(bias) for every direct pair (gather / scatter)


def _slice_groups(t: Tensor, ndim: int, g0: int, g1: int) -> Tensor:
    """Slice dim 2 of a tensor broadcastable to `ndim` dims, keeping size-1 (broadcast) dims."""
    t = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
    return t if t.shape[2] == 1 else t[:, :, g0:g1]


def _gather_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows (N, D) gathered at an integer tensor of any shape -> (*index.shape, D)."""
    return rows.index_select(0, index.reshape(-1)).view(*index.shape, rows.shape[1])


def _make_tile(p: _Problem, g0: int, g1: int) -> _Tile:
    B, Hq, Lq, _ = p.q.shape
    Hkv, Lk = p.k.shape[1], p.k.shape[2]
    acc, dev, b, h = p.acc, p.q.device, p.b, p.h

    q_idx, k_idx = p.q_index[:, :, g0:g1], p.k_index[:, :, g0:g1]
    q_ok, k_ok = q_idx >= 0, k_idx >= 0
    q_pos, k_pos = q_idx.clamp(min=0), k_idx.clamp(min=0)  # empty slots read a dummy position 0
    q_row = (b * Hq + h) * Lq + q_pos
    k_row = (b * Hkv + p.kv_h) * Lk + k_pos
    # Upcast before the matmuls: bf16 logits would lose ~3 significant digits.
    q_t = _gather_rows(p.q_rows, q_row).to(acc)
    k_t = _gather_rows(p.k_rows, k_row).to(acc)
    v_t = _gather_rows(p.v_rows, k_row).to(acc)
    if p.key_padding_mask is not None:
        k_ok = k_ok & p.key_padding_mask[b, k_pos]

    sk_t = sv_t = None
    keys, values = k_t, v_t
    if p.summary_k is not None:
        # Slicing keeps stride-0 (expanded) summaries as views; .to() copies only on dtype change.
        sk_t = p.summary_k[:, :, g0:g1].to(acc)
        sv_t = p.summary_v[:, :, g0:g1].to(acc)
        # One matmul against [direct keys; summary keys] (and values): copying keys (W x D) is
        # cheaper than concatenating logits (Wq x W).
        keys, values = torch.cat([k_t, sk_t], dim=-2), torch.cat([v_t, sv_t], dim=-2)
    # Scaling q (Wq x D) is cheaper than scaling the logits (Wq x Wk).
    logits = torch.matmul(q_t * p.scale, keys.transpose(-1, -2))
    direct = logits[..., :k_t.shape[-2]]  # a view: the in-place edits below write into logits
    bias_index = None
    pair_coords = (b.unsqueeze(-1), h.unsqueeze(-1), q_pos.unsqueeze(-1), k_pos.unsqueeze(-2))
    if p.bias is not None:
        bias_index = pair_index(as_4d(p.bias).shape, pair_coords)
        direct += as_4d(p.bias)[bias_index].to(acc)
    # Build the allowed-pairs mask only when something can remove a pair: a full tile with no
    # causal rule, padding or pair mask (e.g. bidirectional routing) skips two passes over it.
    all_slots = bool(q_ok.all())
    if p.causal or p.window or p.pair_mask is not None or p.key_range is not None or not (all_slots and bool(k_ok.all())):
        # Every rule but the pair mask is a range of key positions per query slot, so the pairs to
        # drop are two comparisons: key < low or key > high. An empty query slot gets an empty
        # range and an empty or padding key slot a position past every range (4 passes over the
        # tile instead of one per rule).
        low = torch.zeros((), dtype=torch.int64, device=dev).expand(q_idx.shape)
        high = torch.full((), Lk - 1, dtype=torch.int64, device=dev).expand(q_idx.shape)
        if p.key_range is not None:
            range_low, range_high = p.key_range[:, :, g0:g1].unbind(-1)
            low, high = torch.maximum(low, range_low), torch.minimum(high, range_high)
        if p.causal:
            high = torch.minimum(high, q_idx + p.causal_offset)
        if p.window:  # a band: keys at distance < window (causal: before the query only)
            low = torch.maximum(low, q_idx + (p.causal_offset - p.window + 1))
            if not p.causal:
                high = torch.minimum(high, q_idx + (p.causal_offset + p.window - 1))
        high = torch.where(q_ok, high, -1)
        key = torch.where(k_ok, k_idx, Lk).unsqueeze(-2)
        dropped = (key < low.unsqueeze(-1)) | (key > high.unsqueeze(-1))
        if p.pair_mask is not None:
            dropped |= ~read_at_pairs(p.pair_mask, pair_coords)
        direct.masked_fill_(dropped, -math.inf)
    if sk_t is not None and (p.summary_mask is not None or not all_slots):
        s_allowed = q_ok.unsqueeze(-1)
        if p.summary_mask is not None:
            s_allowed = s_allowed & _slice_groups(p.summary_mask, 5, g0, g1)
        logits[..., k_t.shape[-2]:].masked_fill_(~s_allowed, -math.inf)

    keep = None
    if p.dropout_p > 0:
        S = p.num_summaries
        # Summary columns are numbered after the Lk real keys, distinctly per group.
        s_col = Lk + (torch.arange(g0, g1, device=dev).view(-1, 1) * S + torch.arange(S, device=dev))
        cols = torch.cat([k_pos.unsqueeze(-2), s_col.view(1, 1, g1 - g0, 1, S).expand(B, Hq, -1, -1, -1)], dim=-1)
        keep = dropout_keep(p.dropout_seed, p.dropout_p, ((b * Hq + h).unsqueeze(-1), q_pos.unsqueeze(-1), cols), acc)

    return _Tile(q_t, k_t, v_t, sk_t, sv_t, keys, values, logits, keep, q_row, k_row, bias_index)


# --------------------------------------------------------------------------------------------
# Normalisers
# --------------------------------------------------------------------------------------------


def _softmax_in_place(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(probs, logsumexp) of masked logits, overwriting them: one exp pass instead of two.

    Empty rows (all -inf) give zero probabilities and statistic 0, as `entmax15_stat` does.
    """
    top = logits.amax(dim=-1, keepdim=True)
    top = top.masked_fill_(top == -math.inf, 0.0)
    exp = flushed_exp_(logits.sub_(top))
    total = exp.sum(dim=-1, keepdim=True)
    stat = torch.where(total > 0, top + total.log(), 0.0).squeeze(-1)
    return exp.div_(total.clamp_(min=torch.finfo(total.dtype).tiny)), stat


def _probs(logits: Tensor, stat: Tensor, normalizer: str) -> Tensor:
    """Probabilities from logits and the row statistic (used by forward and backward alike)."""
    if normalizer == "softmax":
        # Overwrites logits: the softmax backward does not need them again.
        return flushed_exp_(logits.sub_(stat.unsqueeze(-1)))
    return probs_from_stat(logits, stat, normalizer)


def _logits_grad(logits: Tensor, stat: Tensor, probs: Tensor, d_probs: Tensor,
                 d_stat: Optional[Tensor], normalizer: str) -> Tensor:
    """Vector-Jacobian product through the normaliser, for both outputs (probs and row stat);
    softmax's in place on the tile temporaries, entmax-1.5's the shared one."""
    if normalizer == "softmax":
        # d softmax: p * (dp - <p, dp>);  d logsumexp / d logits = p.
        # In place on d_probs (a temporary of the caller's): these tiles are the backward's bulk.
        row = (probs * d_probs).sum(dim=-1, keepdim=True)
        if d_stat is not None:
            row -= d_stat.unsqueeze(-1)
        return d_probs.sub_(row).mul_(probs)
    return logits_grad(logits, stat, probs, d_probs, d_stat, normalizer)


# --------------------------------------------------------------------------------------------
# Forward and backward over chunks of groups
# --------------------------------------------------------------------------------------------


def _problem(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
             pair_mask, key_range, *, scale, causal, causal_offset, window, dropout_p, dropout_seed, normalizer) -> _Problem:
    check_inputs(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
              pair_mask, key_range, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    return _Problem(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v,
                    summary_mask, pair_mask, key_range, float(scale), bool(causal), int(causal_offset), int(window), float(dropout_p),
                    dropout_seed, normalizer)


def output_shapes(v: Tensor, q_index: Tensor):
    B, Hq, G, Wq = q_index.shape
    return (B, Hq, G, Wq, v.shape[3]), (B, Hq, G, Wq)


def _acc_dtype(q: Tensor) -> torch.dtype:
    # float32 accumulators for half types; keep float64 exact for float64 inputs.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def forward_torch(
    q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor,
    key_padding_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    summary_k: Optional[Tensor] = None, summary_v: Optional[Tensor] = None,
    summary_mask: Optional[Tensor] = None, pair_mask: Optional[Tensor] = None,
    key_range: Optional[Tensor] = None, *, scale: float, causal: bool = False, causal_offset: int = 0, window: int = 0, dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None, normalizer: str = "softmax",
) -> tuple[Tensor, Tensor]:
    p = _problem(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
                 pair_mask, key_range, scale=scale, causal=causal, causal_offset=causal_offset, window=window, dropout_p=dropout_p,
                 dropout_seed=dropout_seed, normalizer=normalizer)
    out_shape, stat_shape = output_shapes(v, q_index)
    out = q.new_empty(out_shape)
    row_stat = torch.empty(stat_shape, dtype=p.acc, device=q.device)
    for g0, g1 in p.chunks():
        t = _make_tile(p, g0, g1)
        if normalizer == "softmax":
            probs, stat = _softmax_in_place(t.logits)
        else:
            stat = entmax15_stat(t.logits)
            probs = _probs(t.logits, stat, normalizer)
        if t.keep is not None:
            probs = probs * t.keep
        out[:, :, g0:g1] = torch.matmul(probs, t.values)
        row_stat[:, :, g0:g1] = stat
    return out, row_stat


def backward_torch(
    grad_out: Tensor, grad_stat: Optional[Tensor], row_stat: Tensor,
    q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor,
    key_padding_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    summary_k: Optional[Tensor] = None, summary_v: Optional[Tensor] = None,
    summary_mask: Optional[Tensor] = None, pair_mask: Optional[Tensor] = None,
    key_range: Optional[Tensor] = None, *, scale: float, causal: bool = False, causal_offset: int = 0, window: int = 0, dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None, normalizer: str = "softmax",
    bias_grad: bool = False, summary_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias, dsummary_k, dsummary_v); ungrad'ed ones are empty (numel 0)."""
    p = _problem(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
                 pair_mask, key_range, scale=scale, causal=causal, causal_offset=causal_offset, window=window, dropout_p=dropout_p,
                 dropout_seed=dropout_seed, normalizer=normalizer)
    acc, Wk = p.acc, k_index.shape[3]
    # Flat (rows, D) accumulators matching p.q_rows / p.k_rows / p.v_rows, for index_add_.
    dq = torch.zeros(p.q_rows.shape, dtype=acc, device=q.device)
    dk = torch.zeros(p.k_rows.shape, dtype=acc, device=q.device)
    dv = torch.zeros(p.v_rows.shape, dtype=acc, device=q.device)
    bias_grad = bias_grad and bias is not None
    summary_grad = summary_grad and summary_k is not None
    dbias = torch.zeros(bias.shape, dtype=acc, device=q.device) if bias_grad else None
    dsk = torch.zeros(summary_k.shape, dtype=acc, device=q.device) if summary_grad else None
    dsv = torch.zeros(summary_v.shape, dtype=acc, device=q.device) if summary_grad else None

    for g0, g1 in p.chunks():
        t = _make_tile(p, g0, g1)
        d_o = grad_out[:, :, g0:g1].to(acc)
        stat = row_stat[:, :, g0:g1].to(acc)
        d_stat = None if grad_stat is None else grad_stat[:, :, g0:g1].to(acc)
        probs = _probs(t.logits, stat, normalizer)
        dropped = probs if t.keep is None else probs * t.keep

        # out = dropped @ [v; summary_v]
        d_dropped = torch.matmul(d_o, t.values.transpose(-1, -2))
        dv_t = torch.matmul(dropped[..., :Wk].transpose(-1, -2), d_o)
        if summary_grad:
            dsv[:, :, g0:g1] = torch.matmul(dropped[..., Wk:].transpose(-1, -2), d_o)
        d_probs = d_dropped if t.keep is None else d_dropped.mul_(t.keep)
        d_logits = _logits_grad(t.logits, stat, probs, d_probs, d_stat, normalizer)
        d_direct = d_logits[..., :Wk]

        # logits = scale * q @ [k; summary_k]^T; the scale is applied when accumulating.
        dq_t = torch.matmul(d_logits, t.keys)
        dk_t = torch.matmul(d_direct.transpose(-1, -2), t.q)
        if summary_grad:
            dsk[:, :, g0:g1] = torch.matmul(d_logits[..., Wk:].transpose(-1, -2), t.q) * p.scale
        # Scatter-add back to original rows (GQA sums query heads into their kv head). Empty slots
        # point at a dummy row but carry exactly zero gradient (their logits are -inf). No alpha=:
        # index_add_ with a scale takes a slow path on CPU (~3x); dq and dk are scaled once below.
        dq.index_add_(0, t.q_row.reshape(-1), dq_t.reshape(-1, dq.shape[1]))
        dk.index_add_(0, t.k_row.reshape(-1), dk_t.reshape(-1, dk.shape[1]))
        dv.index_add_(0, t.k_row.reshape(-1), dv_t.reshape(-1, dv.shape[1]))
        if bias_grad:
            # index_put_ with accumulate also sums over bias's broadcast dims (they index 0).
            as_4d(dbias).index_put_(t.bias_index, d_direct, accumulate=True)

    dq.mul_(p.scale)
    dk.mul_(p.scale)
    # Custom ops cannot return None; a fresh 0-element tensor stands for "not computed".
    return (
        dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype),
        dbias.to(bias.dtype) if bias_grad else q.new_empty(0),
        dsk.to(summary_k.dtype) if summary_grad else q.new_empty(0),
        dsv.to(summary_v.dtype) if summary_grad else q.new_empty(0),
    )


# --------------------------------------------------------------------------------------------
# Custom ops, fake (meta) kernels and autograd
# --------------------------------------------------------------------------------------------

# The ops run the PyTorch implementations or the Triton kernels (lowering/triton/switch.py decides)
_grouped_attention_op = torch.library.custom_op(
    "attnpass::grouped_attention", dispatching(forward_torch, "grouped_forward"), mutates_args=())
_grouped_attention_backward_op = torch.library.custom_op(
    "attnpass::grouped_attention_backward", dispatching(backward_torch, "grouped_backward"), mutates_args=()
)


@_grouped_attention_op.register_fake
def _forward_fake(q, k, v, q_index, k_index, key_padding_mask=None, bias=None, summary_k=None,
                  summary_v=None, summary_mask=None, pair_mask=None, key_range=None, *, scale, causal=False, causal_offset=0, window=0,
                  dropout_p=0.0, dropout_seed=None, normalizer="softmax"):
    check_inputs(q, k, v, q_index, k_index, key_padding_mask, bias, summary_k, summary_v, summary_mask,
              pair_mask, key_range, scale, causal_offset, dropout_p, dropout_seed, normalizer)
    out_shape, stat_shape = output_shapes(v, q_index)
    return q.new_empty(out_shape), q.new_empty(stat_shape, dtype=_acc_dtype(q))


@_grouped_attention_backward_op.register_fake
def _backward_fake(grad_out, grad_stat, row_stat, q, k, v, q_index, k_index, key_padding_mask=None,
                   bias=None, summary_k=None, summary_v=None, summary_mask=None, pair_mask=None, key_range=None,
                   *, scale, causal=False, causal_offset=0, window=0, dropout_p=0.0, dropout_seed=None,
                   normalizer="softmax", bias_grad=False, summary_grad=False):
    with_summary = summary_grad and summary_k is not None
    return (
        q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
        bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0),
        summary_k.new_empty(summary_k.shape) if with_summary else q.new_empty(0),
        summary_v.new_empty(summary_v.shape) if with_summary else q.new_empty(0),
    )


_TENSOR_ARGS = ("q", "k", "v", "q_index", "k_index", "key_padding_mask", "bias", "summary_k",
                "summary_v", "summary_mask", "pair_mask", "key_range")


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    # Callers rarely use row_stat: leave its gradient None rather than a tensor of zeros that the
    # backward would multiply through every tile.
    ctx.set_materialize_grads(False)
    ctx.settings = dict(keyword_only_inputs)


def _backward(ctx, grad_out, grad_stat):
    *inputs, row_stat = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(inputs[0].new_empty(output_shapes(inputs[2], inputs[3])[0]))
    # The dispatcher drops trailing arguments equal to their defaults (None), so needs_input_grad
    # may be shorter than the argument list; absent arguments need no gradient.
    flags = tuple(ctx.needs_input_grad) + (False,) * (len(_TENSOR_ARGS) - len(ctx.needs_input_grad))
    needs = dict(zip(_TENSOR_ARGS, flags))
    dq, dk, dv, dbias, dsk, dsv = _grouped_attention_backward_op(
        grad_out, grad_stat, row_stat, *inputs, **ctx.settings,
        bias_grad=needs["bias"], summary_grad=needs["summary_k"] or needs["summary_v"],
    )
    grads = dict(q=dq, k=dk, v=dv, bias=dbias, summary_k=dsk, summary_v=dsv)
    return tuple(grads[name] if needs[name] and name in grads else None for name in _TENSOR_ARGS)


_grouped_attention_op.register_autograd(_backward, setup_context=_setup_context)
