"""Block-sparse attention on CPU SDPA's flash kernel: whole key blocks per query block, inference only.

A block layout gives each block of `block` consecutive queries the same key blocks. When the query
heads that share a key/value head (GQA) also share the choice, one group of the layout is
(query heads of a kv head) x (a query block) against the chosen key blocks of that kv head: its keys
are gathered once and its queries stacked along the query axis, and the flash kernel computes it as
one small dense attention. That is what makes a block layout cheaper than the grouped kernel, which
gathers per query head and masks per pair.

Masking stays per pair without a per-pair mask tensor: a chosen key block that every query of the
block may see whole (under the causal rule) needs only a per-key mask (the block's validity, key
padding, positions past the last key), broadcast over the queries. Under the causal rule at most two
key blocks per query block are seen by some of its queries and not others (the ones holding the
limits i + causal_offset of its first and last query); they are computed as a second part with a
per-query mask, and the two parts are merged by their logsumexp (one softmax over their union).

The flash kernel returns no gradient for its logsumexp and takes no dropout: training, bias and
general masks take the grouped kernel (`grouped_attention`), which computes the same pairs (tested).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Query blocks per flash call: bounds the gathered keys (chunk x top x block per group) kept at once.
_QUERY_BLOCKS_PER_CALL = 16


def block_flash_attention(q: Tensor, k: Tensor, v: Tensor, key_blocks: Tensor, *, block: int, scale: float,
                          causal: bool = False, causal_offset: int = 0, key_padding_mask: Tensor | None = None,
                          mass_column: bool = False) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv), logsumexp (B, Hq, Lq)) of ONE softmax per query over its block's keys.

    q (B, Hq, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv). key_blocks (B, Hs, ceil(Lq / block), top)
    int64 key-block indices (-1: none), chosen per selection head: Hs = Hkv (the query heads of a kv
    head share them) or Hs = Hq. Query i, in block i // block, sees key j of a chosen block if
    j < Lk, key_padding_mask[b, j] (when given) and, causal, j <= i + causal_offset. A query that sees
    no key gets output 0 and statistic 0 (the kernels' convention).

    `mass_column`: v's last column is ones (`attnpass.methods.anchor.with_mass`); the output's is each
    row's probability mass, 1 where it sees a key, 0 where none, set here rather than computed."""
    if mass_column:
        out, lse = block_flash_attention(q, k, v[..., :-1], key_blocks, block=block, scale=scale, causal=causal,
                                         causal_offset=causal_offset, key_padding_mask=key_padding_mask)
        return torch.cat([out, (lse != 0).unsqueeze(-1).to(out.dtype)], dim=-1), lse
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    Hs, n_qb, top = key_blocks.shape[1:]
    if Hs not in (Hq, Hkv) or Hq % Hkv or n_qb != -(-Lq // block):
        raise ValueError(f"block_flash_attention: key_blocks {tuple(key_blocks.shape)} does not fit q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)} with block={block}")
    out = q.new_zeros(B, Hq, n_qb * block, Dv)
    lse = q.new_zeros(B, Hq, n_qb * block, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    if Lq == 0 or Lk == 0:
        return out[:, :, :Lq], lse[:, :, :Lq]
    width = max(D, Dv)  # the flash kernel wants one head size: zero columns change no logit and no output
    n_kb = -(-Lk // block)
    keys = _blocks(_pad(k, width - D, n_kb * block - Lk), n_kb, block)                # (B, Hkv, n_kb, block, W)
    values = _blocks(_pad(v, width - Dv, n_kb * block - Lk), n_kb, block)
    rows = Hq // Hs * block  # one group's stacked queries
    queries = _pad(q, width - D, n_qb * block - Lq).view(B, Hs, Hq // Hs, n_qb, block, width)
    key_ok = torch.ones(B, n_kb * block, dtype=torch.bool, device=q.device) if key_padding_mask is None \
        else F.pad(key_padding_mask.to(torch.bool), (0, n_kb * block - Lk))
    key_ok[:, Lk:] = False
    key_ok = key_ok.view(B, 1, n_kb, block)
    kv_head = torch.arange(Hs, device=q.device) * Hkv // Hs
    batch = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    for start in range(0, n_qb, _QUERY_BLOCKS_PER_CALL):
        stop = min(start + _QUERY_BLOCKS_PER_CALL, n_qb)
        chosen = key_blocks[:, :, start:stop]                                          # (B, Hs, c, top)
        qs = queries[:, :, :, start:stop].transpose(2, 3).reshape(-1, 1, rows, width)
        first_query = torch.arange(start, stop, device=q.device) * block
        # causal: blocks from `split` on hold the limit of some query of the block and not of its first
        split = torch.div(first_query + causal_offset + 1, block, rounding_mode="floor") if causal \
            else torch.full_like(first_query, n_kb)
        whole = (chosen >= 0) & (chosen < split.view(1, 1, -1, 1))
        parts = [_flash_part(qs, keys, values, chosen, whole, key_ok, kv_head, batch, rows, scale)]
        if causal:
            edge = split.view(1, 1, -1, 1) + torch.arange(2, device=q.device)         # (1, 1, c, 2)
            edge_chosen = (chosen.unsqueeze(-1) == edge.unsqueeze(-2)).any(-2) & (edge >= 0) & (edge < n_kb)
            edge = edge.expand_as(edge_chosen).clamp(0, n_kb - 1)
            key_pos = (edge.unsqueeze(-1) * block + torch.arange(block, device=q.device)).flatten(-2)
            query_pos = first_query.view(-1, 1) + torch.arange(block, device=q.device)  # (c, block)
            seen = key_pos.unsqueeze(-2) <= (query_pos + causal_offset).view(1, 1, -1, block, 1)
            seen = seen & edge_chosen.repeat_interleave(block, -1).unsqueeze(-2)      # (B, Hs, c, block, 2 block)
            parts.append(_flash_part(qs, keys, values, edge, seen, key_ok, kv_head, batch, rows, scale))
        part_out, part_lse = _merge(parts)
        c = stop - start
        out[:, :, start * block:stop * block] = part_out[..., :Dv].view(B, Hs, c, Hq // Hs, block, Dv) \
            .transpose(2, 3).reshape(B, Hq, c * block, Dv)
        lse[:, :, start * block:stop * block] = part_lse.view(B, Hs, c, Hq // Hs, block) \
            .transpose(2, 3).reshape(B, Hq, c * block)
    return out[:, :, :Lq], lse[:, :, :Lq]


def _pad(x: Tensor, columns: int, rows: int) -> Tensor:
    return F.pad(x, (0, columns, 0, rows)) if columns or rows else x


def _blocks(x: Tensor, n_blocks: int, block: int) -> Tensor:
    return x.view(*x.shape[:2], n_blocks, block, x.shape[-1])


def _flash_part(qs, keys, values, slots, allowed, key_ok, kv_head, batch, rows: int, scale: float):
    """One part: every group against the key blocks `slots` (B, Hs, c, m) (clamped; `allowed` says
    which pairs count: (B, Hs, c, m) per block, or (B, Hs, c, block, m * block) per query).
    Returns (out (groups, rows, W), logsumexp (groups, rows) with -inf where a row sees nothing)."""
    B, Hs, c, m = slots.shape
    block, width = keys.shape[-2], keys.shape[-1]
    index = slots.clamp(min=0)
    kv = kv_head.view(1, -1, 1, 1)
    seen = key_ok[batch, 0, index]                                                     # (B, Hs, c, m, block)
    if allowed.dim() == 4:  # per key block: the same for every query of the group
        seen = (seen & allowed.unsqueeze(-1)).flatten(-2).unsqueeze(-2)               # (B, Hs, c, 1, m block)
    else:
        seen = seen.flatten(-2).unsqueeze(-2) & allowed                                # (B, Hs, c, block, m block)
        seen = seen.unsqueeze(3).expand(-1, -1, -1, rows // block, -1, -1).flatten(3, 4)
    groups = B * Hs * c
    mask = torch.zeros(seen.shape, dtype=qs.dtype, device=qs.device).masked_fill_(~seen, -math.inf)
    # whole blocks as rows of a (B * Hkv * n_kb, block * W) view: index_select copies each row at once
    rows_of = ((batch * keys.shape[1] + kv) * keys.shape[2] + index).view(-1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qs, keys.reshape(-1, block * width).index_select(0, rows_of).view(groups, 1, m * block, width),
        values.reshape(-1, block * width).index_select(0, rows_of).view(groups, 1, m * block, width),
        0.0, False, attn_mask=mask.view(groups, 1, -1, m * block), scale=scale)
    filled = seen.any(-1).view(groups, -1).expand(groups, rows)
    acc = torch.float64 if qs.dtype == torch.float64 else torch.float32
    return out.view(groups, rows, width), torch.where(filled, lse.view(groups, rows).to(acc), -math.inf)


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
