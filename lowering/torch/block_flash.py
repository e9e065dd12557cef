"""Block-sparse attention on CPU SDPA's flash kernel: whole key blocks per query block, inference only.

A block layout gives each block of `block` consecutive queries the same key blocks. When the query
heads that share a key/value head (GQA) also share the choice, one group of the layout is
(query heads of a kv head) x (a query block) against the chosen key blocks of that kv head: its keys
are gathered once and its queries stacked along the query axis, and the flash kernel computes it as
one small dense attention. That is what makes a block layout cheaper than the grouped kernel, which
gathers per query head and masks per pair.

Masking stays per pair without a per-pair mask tensor: a key block that every query of the block
sees whole needs only a per-key mask (the block's validity, key padding, positions past the last
key), broadcast over the queries. Which key blocks a query block sees only in part is fixed by the
block size, the causal offset and the window, the same for every query block (`_block_geometry`):
under the causal rule, the blocks holding its queries' limits and its window's ends. They and the
anchor's sinks are a second flash call with a per-query mask, and the two parts are merged by their
logsumexp (one softmax over their union). The anchor's window and sinks (`attnpass.methods.anchor`)
are thus in the same two calls: no separate anchor call, no merge of more parts.

The flash kernel returns no gradient for its logsumexp and takes no dropout: training, bias and
general masks take the grouped kernel (`grouped_attention`), which computes the same pairs (tested).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpass.lowering.torch.common import positions_mask

# Query blocks per flash call: bounds the gathered keys (chunk x top x block per group) kept at once.
_QUERY_BLOCKS_PER_CALL = 16


def block_flash_attention(q: Tensor, k: Tensor, v: Tensor, key_blocks: Tensor, *, block: int, scale: float,
                          causal: bool = False, causal_offset: int = 0, key_padding_mask: Tensor | None = None,
                          local: int = 0, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv), logsumexp (B, Hq, Lq)) of ONE softmax per query over its block's keys.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv). key_blocks (B, Hs, ceil(Lq / block), top)
    int64 key-block indices (-1: none), chosen per selection head: Hs = Hkv (the query heads of a kv
    head share them) or Hs = Hq. Query i, in block i // block, sees key j of a chosen block if
    j < Lk, key_padding_mask[b, j] (when given) and, causal, j <= i + causal_offset. A query that sees
    no key gets output 0 and statistic 0 (the kernels' convention).

    The anchor's parts (`attnpass.methods.anchor`) join the same softmax: with `local` (causal only),
    the keys i + causal_offset < j <= i + causal_offset + local (its window after the method's limit);
    with `sinks` (B, s) positions (-1: none), those at or before the limit (every one, bidirectional),
    and the chosen blocks then skip them. Both read key_padding_mask."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Hs, n_qb, top = key_blocks.shape[1:]
    if Hs not in (Hq, Hkv) or Hq % Hkv or n_qb != -(-Lq // block):
        raise ValueError(f"block_flash_attention: key_blocks {tuple(key_blocks.shape)} does not fit q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)} with block={block}")
    if local and not causal:
        raise ValueError("block_flash_attention: local= is a window before each query, for causal attention")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if Lq == 0 or Lk == 0:
        return q.new_zeros(B, Hq, Lq, Dv), q.new_zeros(B, Hq, Lq, dtype=acc)
    out = q.new_empty(B, Hq, n_qb * block, Dv)  # every query block is written below
    lse = q.new_empty(B, Hq, n_qb * block, dtype=acc)
    dev = q.device
    width = max(D, Dv)  # the flash kernel wants one head size: zero columns change no logit and no output
    n_kb = -(-Lk // block)
    keys = _pad(k, width - D, n_kb * block - Lk).view(B, Hkv, n_kb, block, width)
    values = _pad(v, width - Dv, n_kb * block - Lk).view(B, Hkv, n_kb, block, width)
    group = Hq // Hs  # query heads stacked in one group's rows
    queries = _pad(q, width - D, n_qb * block - Lq).view(B, Hs, group, n_qb, block, width)
    keep = torch.ones(B, n_kb * block, dtype=torch.bool, device=dev) if key_padding_mask is None \
        else F.pad(key_padding_mask.to(torch.bool), (0, n_kb * block - Lk))
    keep[:, Lk:] = False
    method_keep = keep if sinks is None else keep & ~positions_mask(sinks, n_kb * block)
    kv_head = torch.arange(Hs, device=dev) * Hkv // Hs
    sink_keys = None
    if sinks is not None:  # (B, Hs, s, W): the sinks' keys and values, gathered once
        at = sinks.clamp(min=0).view(B, 1, -1, 1).expand(B, Hkv, -1, width)
        sink_keys = tuple(x.view(B, Hkv, -1, width).gather(2, at)[:, kv_head] for x in (keys, values))
        sink_kept = ((sinks >= 0) & keep.gather(1, sinks.clamp(min=0))).view(B, 1, 1, 1, -1)
    ctx = _Context(keys, values, kv_head, torch.arange(B, device=dev).view(B, 1, 1, 1), group, scale)
    offsets = torch.arange(block, device=dev)
    # relative to query block t: from key block t + first on, a block holds the limit of some query of
    # the block but not of its first (bidirectional: no limit)
    first = (causal_offset + 1) // block if causal else n_kb
    window_blocks, edge_blocks = _block_geometry(block, causal_offset, local) if causal else ((), ())
    for start in range(0, n_qb, _QUERY_BLOCKS_PER_CALL):
        stop = min(start + _QUERY_BLOCKS_PER_CALL, n_qb)
        c = stop - start
        chosen = key_blocks[:, :, start:stop]                                          # (B, Hs, c, top)
        qs = queries[:, :, :, start:stop].transpose(2, 3).reshape(-1, 1, group * block, width)
        query_block = torch.arange(start, stop, device=dev).view(-1, 1)
        limit = (query_block * block + offsets + causal_offset).view(1, 1, c, block, 1)  # j <= limit
        # part 1, blocks every query of the block sees whole (per-key masks): the chosen ones before
        # `first`, and the window's blocks after every query's limit and within every query's window
        slots = [chosen]
        whole = (chosen >= 0) & (chosen < query_block.view(1, 1, -1, 1) + first)
        seen = [_keep_at(method_keep, chosen, block) & whole.unsqueeze(-1)]
        if window_blocks:
            inside = _valid(query_block + torch.tensor(window_blocks, device=dev), n_kb).expand(B, Hs, -1, -1)
            slots.append(inside)
            seen.append(_keep_at(keep, inside, block))
        parts = [ctx.part(qs, torch.cat(slots, -1), torch.cat(seen, -2).flatten(-2).unsqueeze(-2))]
        if edge_blocks or sinks is not None:
            # part 2: the blocks some queries of the block see and others not (chosen keys up to a
            # query's limit, window keys after it), and the sinks; per-query masks where causal
            edge = _valid(query_block + torch.tensor(edge_blocks, device=dev, dtype=torch.int64), n_kb)
            edge = edge.expand(B, Hs, -1, -1)
            key_pos = (edge.unsqueeze(-1) * block + offsets).flatten(-2).unsqueeze(-2)  # (B, Hs, c, 1, e block)
            before = key_pos <= limit if causal else torch.ones_like(key_pos, dtype=torch.bool)  # (no edge blocks)
            was_chosen = ((chosen.unsqueeze(-1) == edge.unsqueeze(-2)) & (edge >= 0).unsqueeze(-2)).any(-2)
            edge_seen = before & (_keep_at(method_keep, edge, block) & was_chosen.unsqueeze(-1)).flatten(-2).unsqueeze(-2)
            if local:
                window = ~before & (key_pos <= limit + local)
                edge_seen = edge_seen | (window & _keep_at(keep, edge, block).flatten(-2).unsqueeze(-2))
            if sinks is not None:
                sink_seen = sink_kept & (sinks.view(B, 1, 1, 1, -1) <= limit) if causal else sink_kept
                edge_seen = torch.cat([edge_seen, sink_seen.expand(-1, Hs, c, edge_seen.shape[3], -1)], dim=-1)
            parts.append(ctx.part(qs, edge, edge_seen, sink_keys))
        part_out, part_lse = _merge(parts)
        out[:, :, start * block:stop * block] = part_out[..., :Dv].view(B, Hs, c, group, block, Dv) \
            .transpose(2, 3).reshape(B, Hq, c * block, Dv)
        lse[:, :, start * block:stop * block] = part_lse.view(B, Hs, c, group, block) \
            .transpose(2, 3).reshape(B, Hq, c * block)
    return out[:, :, :Lq], lse[:, :, :Lq]


def _block_geometry(block: int, offset: int, local: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Key blocks relative to query block t (block t + r), the same for every t: (those every query of
    the block sees whole in its window, those some of its queries see and others not). Relative to
    the block's first query, its limits are offset .. offset + block - 1 and its window ends at
    offset + local .. offset + local + block - 1; key block r holds r * block .. r * block + block - 1."""
    first = (offset + 1) // block            # the first block not every limit covers (method's edge)
    last = (offset + block - 1 + local) // block  # the last block some query's window reaches
    whole, edge = [], []
    for r in range(first, max(last, first + 1) + 1):
        start, end = r * block, r * block + block - 1
        if start > offset + block - 1 + local:  # after every query's window: seen by none
            continue
        if local and start > offset + block - 1 and end <= offset + local:
            whole.append(r)
        else:
            edge.append(r)
    return tuple(whole), tuple(edge)


def _valid(slots: Tensor, n_blocks: int) -> Tensor:
    return torch.where((slots >= 0) & (slots < n_blocks), slots, -1)


def _keep_at(keep: Tensor, slots: Tensor, block: int) -> Tensor:
    """(B, Hs, c, m, block): which keys of the key blocks `slots` (B, Hs, c, m; -1 none) `keep` (B, n_kb * block) keeps."""
    B = keep.shape[0]
    kept = keep.view(B, 1, -1, block)[torch.arange(B, device=keep.device).view(B, 1, 1, 1), 0, slots.clamp(min=0)]
    return kept & (slots >= 0).unsqueeze(-1)


class _Context:
    """What every flash call of one `block_flash_attention` shares: the blocked keys and values, each
    selection head's kv head, the batch index, the query heads per group and the scale."""

    def __init__(self, keys, values, kv_head, batch, group: int, scale: float):
        self.keys, self.values, self.kv_head, self.batch, self.group, self.scale = keys, values, kv_head, batch, group, scale

    def part(self, qs: Tensor, slots: Tensor, seen: Tensor, extra: tuple[Tensor, Tensor] | None = None):
        """Every group against the key blocks `slots` (B, Hs, c, m; -1 none) and the `extra` keys and
        values (B, Hs, s, W) after them; `seen` (B, Hs, c, 1 or block, m * block + s) says which pairs
        count, per key or per query of the block. Returns (out (groups, rows, W), logsumexp (groups,
        rows), -inf where a row sees nothing)."""
        B, Hs, c, m = slots.shape
        n_kb, block, width = self.keys.shape[2:]
        groups, rows = B * Hs * c, self.group * block
        # whole blocks as rows of a (B * Hkv * n_kb, block * W) view: index_select copies each row at once
        where = ((self.batch * self.keys.shape[1] + self.kv_head.view(1, -1, 1, 1)) * n_kb + slots.clamp(min=0)).view(-1)
        gathered = [x.reshape(-1, block * width).index_select(0, where).view(B, Hs, c, m * block, width)
                    for x in (self.keys, self.values)]
        if extra is not None:
            gathered = [torch.cat([g, e.unsqueeze(2).expand(-1, -1, c, -1, -1)], dim=3) for g, e in zip(gathered, extra)]
        n_keys = gathered[0].shape[3]
        filled = seen.any(-1)                                                          # (B, Hs, c, 1 or block)
        if seen.shape[3] > 1:  # per query: the same for every query head of the group
            filled = filled.unsqueeze(3).expand(-1, -1, -1, self.group, -1)
            seen = seen.unsqueeze(3).expand(-1, -1, -1, self.group, -1, -1).flatten(3, 4)
        filled = filled.reshape(groups, -1).expand(groups, rows)
        mask = torch.where(seen, 0.0, -math.inf).to(qs.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qs, gathered[0].view(groups, 1, n_keys, width), gathered[1].view(groups, 1, n_keys, width),
            0.0, False, attn_mask=mask.view(groups, 1, -1, n_keys), scale=self.scale)
        acc = torch.float64 if qs.dtype == torch.float64 else torch.float32
        return out.view(groups, rows, width), torch.where(filled, lse.view(groups, rows).to(acc), -math.inf)


def _pad(x: Tensor, columns: int, rows: int) -> Tensor:
    return F.pad(x, (0, columns, 0, rows)) if columns or rows else x


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One softmax over disjoint parts; rows empty in every part: output 0, statistic 0."""
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        (out_a, lse_a), (out_b, lse_b) = parts
        lse = torch.logaddexp(lse_a, lse_b)
        safe = lse.masked_fill(torch.isinf(lse), 0.0)
        out = (torch.exp(lse_a - safe).unsqueeze(-1) * out_a.to(lse.dtype)
               + torch.exp(lse_b - safe).unsqueeze(-1) * out_b.to(lse.dtype)).to(out_a.dtype)
    empty = torch.isinf(lse)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, 0.0)


# The kernel as one op: a graph holding it (the compile backend's, torch.export's) traces with a
# symbolic length, where the loop over query blocks above would put a guard on the length. Its
# outputs are contiguous, as the fake kernel states them (a compiled graph indexes them that way).
@torch.library.custom_op("attnpass::block_flash_attention", mutates_args=())
def block_flash_op(q: Tensor, k: Tensor, v: Tensor, key_blocks: Tensor, key_padding_mask: Optional[Tensor],
                   sinks: Optional[Tensor], block: int, scale: float, causal: bool, causal_offset: int,
                   local: int) -> tuple[Tensor, Tensor]:
    """`block_flash_attention` (the same arguments, positionally)."""
    out, lse = block_flash_attention(q, k, v, key_blocks, block=block, scale=scale, causal=causal,
                                     causal_offset=causal_offset, key_padding_mask=key_padding_mask, local=local,
                                     sinks=sinks)
    return out.contiguous(), lse.contiguous()


@block_flash_op.register_fake
def _(q, k, v, key_blocks, key_padding_mask, sinks, block, scale, causal, causal_offset, local):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=acc)
