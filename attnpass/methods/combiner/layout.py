"""Which pairs a Combiner site computes directly, which region summaries each query reads, and the
summaries themselves (Combiner, Ren et al. 2021).

Every query i has a position p_i in key space (see `query_positions`). Key positions are cut into
G blocks of `block` consecutive keys; block g is group g of the grouped_attention kernel: its query
slots are the queries whose p_i falls in it, its key slots are its own keys (the direct part). The
rest of the keys a query may see are reached through region summaries, so that every allowed key
is reached exactly once:

- fixed:     regions = the blocks; a group reads every other block (causal: every earlier block).
- axial:     blocks are the rows of a (rows x block) grid; region (r, c) = column c in the rows
             before r (causal) or in every row but r. Group r reads regions (r, 0..block-1).
- logsparse: regions = aligned dyadic spans of blocks, one level per power of two. Group b reads,
             at each level, the sibling of the span containing b: together they tile every other
             block (causal: only the siblings to the left, which tile the blocks before b).

A region's summary key is the max-pool of its real keys; its summary value is the attention of
the max-pooled query of the region (the queries whose p_i falls in it) over its real keys. Pools
are built with variant-specific reductions (block max, exclusive cummax over the grid, pairwise
max per dyadic level), never by gathering region members, so everything stays O(L * block) or
O(L log L) and no Lq x Lk tensor is built.

Region ids: fixed r; axial r * block + c; logsparse level_offset[l] + t for span t of level l.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnpass.lowering.torch.grouped_attention import grouped_attention
from attnpass.methods.slots import bucket_slots
from attnpass.methods.symbolic import ceil_div, smaller, tracing

VARIANTS = ("fixed", "axial", "logsparse")

# Upper bound on the key-index elements of one summary-value kernel call (axial regions hold
# up to `rows` keys each, so all of them at once would be O(L^1.5) int64s).
_REGION_INDEX_BUDGET = 1 << 22

_I64 = torch.int64


@dataclass(frozen=True, eq=False)
class CombinerLayout:
    """Index tensors of one (variant, Lq, Lk, block, causal rule); -1 marks an empty slot."""

    variant: str
    block: int
    len_q: int
    len_k: int
    causal: bool
    causal_offset: int
    q_index: Tensor         # (G, Wq) queries of group g (those whose p_i falls in its block)
    k_index: Tensor         # (G, Wk) direct keys of group g: its block's keys (first groups: p_i < 0, none)
    query_slot: Tensor      # (Lq,) flat slot g * Wq + w holding query i (to read the kernel output)
    summary_region: Tensor  # (G, S) region read by summary slot s of group g; -1 = none
    num_regions: int
    num_levels: int         # logsparse: dyadic levels 0 .. num_levels-1 (0 for the other variants)

    @property
    def num_groups(self) -> int:
        return self.q_index.shape[0]

    @property
    def num_blocks(self) -> int:
        """Key blocks (the last num_blocks groups; groups before them hold queries that see no key)."""
        return ceil_div(self.len_k, self.block)

    @property
    def key_blocks(self) -> Tensor:
        """(num_blocks, block) key positions of each block, -1 past the keys."""
        return self.k_index[self.num_groups - self.num_blocks:]

    @property
    def shared_summaries(self) -> bool:
        """Fixed: every group reads from the same region list, so summaries can be a stride-0 view."""
        return self.variant == "fixed"

    def __repr__(self) -> str:
        G, Wq = self.q_index.shape
        rule = f"causal(offset={self.causal_offset})" if self.causal else "bidirectional"
        return (f"CombinerLayout({self.variant}, block={self.block}, Lq={self.len_q}, Lk={self.len_k}, {rule}, "
                f"groups={G}, query slots={Wq}, key slots={self.k_index.shape[1]}, "
                f"summaries per group={self.summary_region.shape[1]}, regions={self.num_regions})")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def query_positions(len_q: int, len_k: int, causal: bool, causal_offset: int) -> Tensor:
    """Key-space position p_i of every query: i + offset (causal), i (Lq == Lk), floor(i Lk / Lq)."""
    i = torch.arange(len_q, dtype=_I64)
    if causal:
        return i + causal_offset
    if len_q == len_k:
        return i
    return (i * len_k) // len_q


def queries_by_position(len_q: int, len_k: int, causal: bool, causal_offset: int) -> Tensor:
    """(Lk, W) table of the queries whose p_i equals each key position (-1 padded).

    Queries whose p_i lies outside [0, Lk) (causal with Lq != Lk) fall in no region, so they are
    absent here and take no part in pooled queries.
    """
    if _positions_are_shifted(len_q, len_k, causal, causal_offset):  # at most one query per position
        i = torch.arange(len_k, dtype=_I64) - (causal_offset if causal else 0)
        return torch.where((i >= 0) & (i < len_q), i, -1).view(-1, 1)
    pos = query_positions(len_q, len_k, causal, causal_offset)
    inside = (pos >= 0) & (pos < len_k)
    table, _ = _bucket_table(pos[inside], torch.arange(len_q, dtype=_I64)[inside], len_k)
    return table


def _positions_are_shifted(len_q, len_k, causal: bool, causal_offset) -> bool:
    """Whether p_i = i + c with no query past the last key (causal with Lq + offset <= Lk, or Lq == Lk):
    the tables then follow from the lengths by arithmetic, which traces with symbolic lengths."""
    return bool(len_q + causal_offset <= len_k) if causal else bool(len_q == len_k)


def _bucket_table(bucket: Tensor, members: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    """Lay out `members` by their `bucket` ids as rows of a -1 padded table, each row in the members'
    order. Returns (table (num_buckets, W), flat slot bucket * W + rank of each member)."""
    index, slot = bucket_slots(bucket, num_buckets)
    # an empty slot (-1) reads the -1 appended last (also when there is no member at all)
    return F.pad(members, (0, 1), value=-1)[index], slot


def build_layout(variant: str, len_q, len_k, block, causal: bool, causal_offset,
                 device: torch.device | None = None) -> CombinerLayout:
    """The layout of one call shape. Needs Lq, Lk >= 1. With int lengths it is cached (the same shapes
    recur every step); while tracing, and with symbolic lengths (torch.export, torch.compile), it is
    tensor code whose sizes are expressions of them, so the site traces."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown combiner variant {variant!r}; expected one of {VARIANTS}")
    if not causal:
        causal_offset = 0
    concrete = all(type(x) is int for x in (len_q, len_k, block, causal_offset))
    if concrete and not tracing():
        # (not while tracing: fake tensors must not enter the cache, nor cached ones a traced graph)
        return _cached_layout(variant, len_q, len_k, block, causal, causal_offset, device)
    if variant != "fixed":
        raise NotImplementedError(f"combiner variant {variant!r} needs concrete lengths (logsparse: its level count "
                                  "is ceil(log2(blocks)); axial: its cummax pools ask whether a grid of a symbolic "
                                  "block is empty); variant 'fixed' traces with symbolic ones")
    return _build_layout(variant, len_q, len_k, block, causal, causal_offset, device)


def _build_layout(variant: str, len_q, len_k, block, causal: bool, causal_offset,
                  device: torch.device | None) -> CombinerLayout:
    block = smaller(block, len_k)  # one block already covers every key
    G = ceil_div(len_k, block)
    # Queries with p_i past the keys (causal, Lq > Lk + offset) join the last block: they see every
    # key. Queries with p_i < 0 see nothing (an offset below -i: Lq > Lk, or the layout of a site
    # whose local window the anchor computes); they fill `empty` groups of `block` slots placed
    # first, with no keys and no summaries, instead of widening block 0's group to all of them.
    if _positions_are_shifted(len_q, len_k, causal, causal_offset):
        empty, q_index, query_slot = _shifted_query_groups(len_q, block, G, causal_offset)
    else:
        pos = query_positions(len_q, len_k, causal, causal_offset).clamp(max=len_k - 1)
        before = int((pos < 0).sum())  # the first queries (p_i grows with i)
        empty = ceil_div(before, block)
        bucket = torch.where(pos < 0, torch.arange(len_q, dtype=_I64) // block, empty + pos.clamp(min=0) // block)
        q_index, query_slot = _bucket_table(bucket, torch.arange(len_q, dtype=_I64), empty + G)
    k_index = torch.arange(G * block, dtype=_I64).view(G, block)
    k_index = k_index.masked_fill(k_index >= len_k, -1)

    g = torch.arange(G, dtype=_I64).view(G, 1)
    num_levels = 0
    if variant == "fixed":
        r = torch.arange(G, dtype=_I64).view(1, G)
        reads = r < g if causal else r != g
        summary_region = torch.where(reads, r, -1)
        num_regions = G
    elif variant == "axial":
        c = torch.arange(block, dtype=_I64).view(1, block)
        summary_region = g * block + c
        num_regions = G * block
    else:
        num_levels = max(0, math.ceil(math.log2(G)))
        level = torch.arange(num_levels, dtype=_I64).view(1, -1)
        sibling = (g >> level) ^ 1
        # level l holds (2**num_levels >> l) spans; ids run level by level
        offsets = torch.tensor([sum((1 << num_levels) >> m for m in range(l)) for l in range(num_levels)],
                               dtype=_I64).view(1, -1)
        summary_region = offsets + sibling
        if causal:
            summary_region = summary_region.masked_fill(sibling > (g >> level), -1)
        num_regions = (2 << num_levels) - 2  # sum over levels of 2**num_levels >> l

    # the empty groups first (none: a cat of nothing, so no branch on their count)
    k_index = torch.cat([k_index.new_full((empty, k_index.shape[1]), -1), k_index])
    summary_region = torch.cat([summary_region.new_full((empty, summary_region.shape[1]), -1), summary_region])
    device = device or torch.device("cpu")
    return CombinerLayout(variant, block, len_q, len_k, causal, causal_offset, q_index.to(device),
                          k_index.to(device), query_slot.to(device), summary_region.to(device), num_regions,
                          num_levels)


# Concrete shapes recur every step; tensors built outside inference mode stay usable by autograd.
_cached_layout = functools.lru_cache(maxsize=64)(torch.inference_mode(False)(_build_layout))


def _shifted_query_groups(len_q, block, num_blocks, causal_offset) -> tuple:
    """(empty groups, q_index (empty + num_blocks, Wq), query_slot (Lq,)) when p_i = i + offset: the
    bucket table of the query positions, by arithmetic. The first `before` queries (p_i < 0) fill
    groups of `block`; key block b holds the queries from max(b * block - offset, 0) on, in order."""
    before = smaller(len_q, -causal_offset) if causal_offset < 0 else 0
    empty = ceil_div(before, block)
    width = smaller(block, len_q)
    w = torch.arange(width, dtype=_I64).view(1, -1)
    g = torch.arange(empty, dtype=_I64).view(-1, 1)
    early = g * block + w
    early = early.masked_fill(early >= before, -1)
    b = torch.arange(num_blocks, dtype=_I64).view(-1, 1)
    start = (b * block - causal_offset).clamp(min=0)
    late = start + w
    late = late.masked_fill((late >= len_q) | (late + causal_offset >= (b + 1) * block), -1)

    i = torch.arange(len_q, dtype=_I64)
    own_block = (i + causal_offset).clamp(min=0) // block
    late_slot = (empty + own_block) * width + i - (own_block * block - causal_offset).clamp(min=0)
    early_group = i // block  # (i - early_group * block, not i % block: ONNX has no remainder by a symbolic int)
    early_slot = early_group * width + i - early_group * block
    query_slot = torch.where(i < before, early_slot, late_slot)
    return empty, torch.cat([early, late]), query_slot


def region_key_batches(layout: CombinerLayout) -> Iterator[tuple[int, Tensor]]:
    """The key positions of every region, as (first region id, keys (n, W) -1 padded) batches.

    Batches cover region ids 0 .. num_regions-1 in order; regions of one batch have the same
    width, so each batch is one grouped_attention call (one query slot per region). Axial summary
    values are computed per column instead (`_axial_summary_values`); for axial this listing is
    the definition of its regions, which the coverage tests read.
    """
    block, len_k, G = layout.block, layout.len_k, layout.num_blocks
    if layout.variant == "fixed":
        yield 0, layout.key_blocks
    elif layout.variant == "logsparse":
        first = 0
        for level in range(layout.num_levels):
            width = block << level
            spans = (1 << layout.num_levels) >> level
            keys = torch.arange(spans * width, dtype=_I64).view(spans, width)
            yield first, keys.masked_fill(keys >= len_k, -1)
            first += spans
    else:
        # Region (r, c): column c of the rows before r (causal: slot t is row t, valid for t < r),
        # or of every row but r (slot t is row t, shifted past r). Chunks of rows bound the index.
        per_region = G - 1
        rows_per_batch = max(1, _REGION_INDEX_BUDGET // (block * max(1, per_region)))
        for r0 in range(0, G, rows_per_batch):
            r1 = min(G, r0 + rows_per_batch)
            r = torch.arange(r0, r1, dtype=_I64).view(-1, 1, 1)
            c = torch.arange(block, dtype=_I64).view(1, -1, 1)
            if layout.causal:
                t = torch.arange(max(1, r1 - 1), dtype=_I64).view(1, 1, -1)
                row, valid = t, t < r
            else:
                t = torch.arange(max(1, per_region), dtype=_I64).view(1, 1, -1)
                row = t + (t >= r).to(_I64)
                valid = row < G
            keys = row * block + c
            keys = keys.masked_fill(~valid | (keys >= len_k), -1)
            yield r0 * block, keys.view((r1 - r0) * block, -1)


# --------------------------------------------------------------------------------------------
# Pooling and summaries
# --------------------------------------------------------------------------------------------


def pool_regions(x: Tensor, layout: CombinerLayout) -> Tensor:
    """Max of x (B, H, Lk, C) over each region's positions -> (B, H, num_regions, C).

    Entries to leave out must already be -inf; a region with nothing left gets -inf.
    """
    B, H, _, C = x.shape
    G, block = layout.num_blocks, layout.block
    if layout.variant == "logsparse":
        G = 1 << layout.num_levels
    x = F.pad(x, (0, 0, 0, G * block - layout.len_k), value=-math.inf).view(B, H, G, block, C)
    if layout.variant == "fixed":
        return x.amax(3)
    if layout.variant == "logsparse":
        level = x.amax(3)
        levels = []
        for _ in range(layout.num_levels):
            levels.append(level)
            level = level.view(B, H, level.shape[2] // 2, 2, C).amax(3)
        return torch.cat(levels, 2) if levels else x.new_empty(B, H, 0, C)
    # axial: x is the (rows, cols) grid; exclusive max over the rows above (and below) each row.
    # The maxima are located without autograd and read back with one gather, so backward keeps a
    # single index tensor rather than two cummax index tensors plus torch.maximum's inputs.
    with torch.no_grad():
        empty_row = x.new_full((B, H, 1, block, C), -math.inf)
        zero_row = torch.zeros((B, H, 1, block, C), dtype=_I64, device=x.device)
        values, rows = torch.cummax(x, 2)
        best = torch.cat([empty_row, values[:, :, :-1]], 2)
        best_row = torch.cat([zero_row, rows[:, :, :-1]], 2)
        if not layout.causal:
            values, rows = torch.cummax(x.flip(2), 2)
            below = torch.cat([values.flip(2)[:, :, 1:], empty_row], 2)
            below_row = torch.cat([(G - 1 - rows).flip(2)[:, :, 1:], zero_row], 2)
            take_below = below > best
            best = torch.where(take_below, below, best)
            best_row = torch.where(take_below, below_row, best_row)
        empty = best == -math.inf
    return x.gather(2, best_row).masked_fill(empty, -math.inf).reshape(B, H, G * block, C)


def pooled_regions(x: Tensor, keep: Tensor, layout: CombinerLayout) -> tuple[Tensor, Tensor]:
    """Max-pool x (B, H, Lk, C) over each region's kept positions (keep: bool broadcastable to (B, 1, Lk)).

    Returns (pooled (B, H, N, C), zero where the region keeps nothing; nonempty (B, N) bool).
    """
    nonempty = pool_regions(keep.to(x.dtype).unsqueeze(-1), layout)[:, 0, :, 0] > 0
    pooled = pool_regions(x.masked_fill(~keep.unsqueeze(-1), -math.inf), layout)
    # Zero, not -inf: empty regions are masked out later, but -inf * 0 would poison the gradients.
    return torch.where(nonempty[:, None, :, None], pooled, 0.0), nonempty


def pooled_queries(q: Tensor, key_keep: Tensor | None, layout: CombinerLayout) -> Tensor:
    """Max-pooled query of every region (B, Hq, N, D); zero for a region no query falls in.

    Padding queries are left out when Lq == Lk and key_keep is given (query i is token i then).
    """
    B, H, _, D = q.shape
    table = queries_by_position(layout.len_q, layout.len_k, layout.causal, layout.causal_offset).to(q.device)
    Lk, W = table.shape
    keep = table >= 0
    if key_keep is not None and layout.len_q == layout.len_k:
        keep = keep & key_keep[:, table.clamp(min=0)]
    keep = keep.view(-1, 1, Lk, W).expand(B, 1, Lk, W)
    by_position = q.index_select(2, table.clamp(min=0).view(-1)).view(B, H, Lk, W, D)
    by_position = by_position.masked_fill(~keep.unsqueeze(-1), -math.inf)
    # one query per position (self-attention, Lq <= Lk): nothing to reduce, nothing for amax to save
    by_position = by_position.squeeze(3) if W == 1 else by_position.amax(3)
    return pooled_regions(by_position, keep.any(-1), layout)[0]


def summary_values(pooled_q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None,
                   layout: CombinerLayout, scale: float) -> Tensor:
    """Attention of each region's pooled query over the region's real keys -> (B, Hq, N, Dv).

    One grouped_attention call per batch of equal-width regions (groups = regions, one query
    slot each), so GQA and autograd come from the kernel. Regions without a real key get zeros.
    """
    if layout.variant == "axial":
        return _axial_summary_values(pooled_q, k, v, key_keep, layout, scale)
    B, H = pooled_q.shape[:2]
    parts = []
    for first, keys in region_key_batches(layout):
        n, width = keys.shape
        slots = torch.arange(n, dtype=_I64, device=k.device).view(1, 1, n, 1).expand(B, H, n, 1)
        out, _ = grouped_attention(
            pooled_q[:, :, first:first + n], k, v, slots, keys.to(k.device).expand(B, H, n, width),
            scale=scale, key_padding_mask=key_keep,
        )
        parts.append(out.squeeze(3))
    return torch.cat(parts, 2)


def _axial_summary_values(pooled_q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None,
                          layout: CombinerLayout, scale: float) -> Tensor:
    """Axial summary values with one kernel group per COLUMN: (rows x rows) tiles, not one tiny
    group per region.

    Region (r, c)'s pooled query sits at grid position r * cols + c of `pooled_q`; column c's keys
    are at r' * cols + c. Causal regions (rows r' < r) are the kernel's causal rule with offset
    -cols. Bidirectional regions (rows r' != r) are the rows above plus the rows below, two
    calls (the second held to r' > r by key_range) merged exactly through their logsumexps.
    """
    B, H, N, _ = pooled_q.shape
    cols, rows, len_k = layout.block, layout.num_blocks, layout.len_k
    dev = k.device
    grid = (torch.arange(rows, device=dev).view(1, rows) * cols + torch.arange(cols, device=dev).view(cols, 1))
    q_index = grid.expand(B, H, cols, rows)                                   # group c: regions (r, c)
    k_index = grid.masked_fill(grid >= len_k, -1).expand(B, H, cols, rows)    # group c: column c's keys
    common = {"scale": scale, "key_padding_mask": key_keep}
    above, above_stat = grouped_attention(pooled_q, k, v, q_index, k_index, causal=True, causal_offset=-cols, **common)
    if layout.causal:
        out = above
    else:
        low = (grid + cols).expand(B, H, cols, rows)  # keys strictly below the region's row
        key_range = torch.stack([low, torch.full_like(low, len_k)], dim=-1)
        below, below_stat = grouped_attention(pooled_q, k, v, q_index, k_index, key_range=key_range, **common)
        # Emptiness from structure (real keys above / below in the column), not from values.
        real = torch.ones(B, len_k, dtype=torch.bool, device=dev) if key_keep is None else key_keep
        real = F.pad(real, (0, rows * cols - len_k)).view(B, 1, rows, cols).transpose(2, 3).to(_I64)
        count_above = real.cumsum(-1) - real
        count_below = real.sum(-1, keepdim=True) - real.cumsum(-1)
        has_above, has_below = count_above > 0, count_below > 0
        top = torch.maximum(torch.where(has_above, above_stat, -math.inf), torch.where(has_below, below_stat, -math.inf))
        top = torch.where(has_above | has_below, top, 0.0)
        w_above = torch.where(has_above, torch.exp(above_stat - top), 0.0)
        w_below = torch.where(has_below, torch.exp(below_stat - top), 0.0)
        total = (w_above + w_below).clamp(min=torch.finfo(w_above.dtype).tiny)
        out = ((w_above / total).unsqueeze(-1) * above + (w_below / total).unsqueeze(-1) * below).to(above.dtype)
    # slot (c, r) holds region r * cols + c
    return out.transpose(2, 3).reshape(B, H, rows * cols, -1)[:, :, :N]


def regions_in_band(layout: CombinerLayout, offset: int, window: int) -> Tensor:
    """(1, 1, G, Wq, S) bool: whether summary slot s of query slot (g, w) stands for keys that all lie
    in the query's band (distance < window from i + offset; causal: j > i + offset - window). A
    summary pools its whole region, so a region reaching out of the band is left out rather than cut."""
    positions = torch.arange(layout.len_k, dtype=torch.float64, device=layout.q_index.device).view(1, 1, -1, 1)
    region = layout.summary_region.clamp(min=0)
    first = (-pool_regions(-positions, layout)[0, 0, :, 0])[region].unsqueeze(1)   # (G, 1, S); +inf: empty
    centre = (layout.q_index + offset).to(torch.float64).unsqueeze(-1)            # (G, Wq, 1)
    inside = first > centre - window
    if not layout.causal:  # and its last key before the band's far end
        last = pool_regions(positions, layout)[0, 0, :, 0][region].unsqueeze(1)
        inside = inside & (last < centre + window)
    return inside.view(1, 1, *inside.shape)


def region_summaries(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None, layout: CombinerLayout,
                     scale: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """(summary_k (B, Hq, G, S, D), summary_v (B, Hq, G, S, Dv), summary_mask (B, 1, G, 1, S)) for
    the main kernel call, or None when no group reads any summary."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    G, S = layout.summary_region.shape
    if statically_known_true(S == 0):  # (a symbolic S is >= 1: fixed reads G >= 1 blocks, axial block >= 1)
        return None
    real = torch.ones(1, 1, layout.len_k, dtype=torch.bool, device=k.device) if key_keep is None \
        else key_keep.view(B, 1, -1)
    pooled_k, has_key = pooled_regions(k, real, layout)
    pooled_k = pooled_k.repeat_interleave(Hq // Hkv, dim=1)  # summary keys per kv head, read by its q heads
    pooled_v = summary_values(pooled_queries(q, key_keep, layout), k, v, key_keep, layout, scale)

    region = layout.summary_region.clamp(min=0)
    summary_mask = (layout.summary_region >= 0) & has_key[:, region]
    if layout.shared_summaries:
        # Every group reads the same regions: a stride-0 view instead of G copies.
        summary_k = pooled_k.unsqueeze(2).expand(-1, -1, G, -1, -1)
        summary_v = pooled_v.unsqueeze(2).expand(-1, -1, G, -1, -1)
    else:
        summary_k = pooled_k.index_select(2, region.view(-1)).view(B, Hq, G, S, -1)
        summary_v = pooled_v.index_select(2, region.view(-1)).view(B, Hq, G, S, -1)
    return summary_k, summary_v, summary_mask.view(-1, 1, G, 1, S)
