"""Sparsefinder's block predictor: whole key blocks per query block, chosen by sampled exact scores.

The pair predictors of `predictors` (distance, quantization, clustering) guess each pair from r-dim
projections; on a pretrained RoPE model such guesses miss the few keys a retrieval query needs (a
pass key deep in a long prompt). This predictor guesses at block granularity instead, from the
model's own scores on a sample of the queries:

- queries and keys are cut into blocks of `block` consecutive positions; query block t holds
  queries [t * block, (t + 1) * block);
- `sampled_queries` of its queries, spread over the block and always including its last one (under
  the causal rule the one that may see the most), score every key they may see exactly (q . k *
  scale, the site's own logits); each sampled query's logits are max-pooled per key block and turned
  into a softmax over key blocks: how much of that query's attention a block can hold at most;
- a key block's score for the query block is its largest share over the sampled queries, and the
  query block computes the keys of its `top_blocks` best blocks (ties to the lowest block index,
  as everywhere a top-k chooses), every query of the block the same keys. A block no sampled query
  may see is never chosen.
- with `kv_heads_share` (the default), the query heads that share a key/value head (GQA) choose
  together: a block's score is its largest share over their sampled queries too. Their queries then
  form one group against one gathered set of keys (`lowering/torch/block_flash`), which is what
  makes the layout cheaper than dense attention on a CPU; with it off, each query head chooses alone.

The scoring costs `sampled_queries / block` of the full QK^T product and is done over chunks of query
blocks, at most `block` sampled queries per head at a time (no Lq x Lk tensor); the attention then
costs `top_blocks * block` keys per query. The method's causal rule, band, key padding and layout offset (the anchor's window and sinks, see
`attnpass/methods/anchor.py`) hold inside the chosen blocks: the kernel reads them per pair.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attnpass.lowering.torch.ordered_topk import topk_lowest_index
from attnpass.methods.sparsefinder.predictors import csr_from_slots

OPTIONS = ("block", "top_blocks", "sampled_queries", "kv_heads_share")
DEFAULTS = dict(block=32, top_blocks=13, sampled_queries=8, kv_heads_share=True)
# Elements of one chunk of sampled logits (fp32): bounds the scoring's peak memory.
_CHUNK_ELEMENTS = 1 << 22


def sampled_rows(len_q: int, block: int, samples: int, device=None) -> Tensor:
    """(blocks, samples) query positions: per block, its last query and every (block // samples)-th
    one before it, clamped to the last query (a short last block repeats its last query)."""
    blocks = -(-len_q // block)
    stride = max(block // samples, 1)
    offsets = block - 1 - stride * torch.arange(samples, device=device)
    rows = torch.arange(blocks, device=device)[:, None] * block + offsets.clamp(min=0)[None, :]
    return rows.clamp(max=len_q - 1)


def visible(query_pos: Tensor, key_pos: Tensor, len_k: int, causal: bool, offset: int, window: int,
            key_keep: Tensor | None) -> Tensor:
    """Which key at `key_pos` the query at the same row of `query_pos` (n,) may see: the causal rule,
    band and padding (positions outside [0, len_k) are empty slots or block padding: never).
    `key_pos` is (batch or 1, ..., n or 1, m); the result broadcasts it against the queries and, with
    `key_keep` (B, len_k), against the batch."""
    seen = (key_pos >= 0) & (key_pos < len_k)
    if causal:
        last = (query_pos + offset)[:, None]
        seen = seen & (key_pos <= last)
        if window:
            seen = seen & (key_pos > last - window)
    if key_keep is not None:
        batch = torch.arange(len(key_keep), device=key_pos.device).view(-1, *(1,) * (key_pos.dim() - 1))
        seen = seen & key_keep.to(torch.bool)[batch, key_pos.clamp(0, len_k - 1)]
    return seen


@torch.no_grad()
def block_scores(q: Tensor, k: Tensor, *, scale: float, block: int, samples: int, causal: bool = False,
                 offset: int = 0, window: int = 0, key_keep: Tensor | None = None,
                 kv_heads_share: bool = False) -> Tensor:
    """(B, Hs, query blocks, key blocks) float32: each key block's largest softmax share over its
    query block's sampled queries (0 for a block none of them may see). q (B, Hq, Lq, D), k (B, Hkv, Lk, D);
    Hs = Hkv with `kv_heads_share` (the largest share over the query heads of a kv head too), else Hq."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n_kb = -(-Lk // block)
    rows = sampled_rows(Lq, block, samples, q.device)  # (nq, s)
    n_qb = rows.shape[0]
    # a chunk scores at most `block` sampled queries per head (and at most _CHUNK_ELEMENTS logits)
    per_block = max(B * Hq * samples * n_kb * block, 1)
    chunk = max(min(_CHUNK_ELEMENTS // per_block, block // samples), 1)
    # keys padded to whole blocks, so a chunk's logits are viewed as blocks without a copy
    keys = F.pad(k.float(), (0, 0, 0, n_kb * block - Lk))
    key_pos = torch.arange(n_kb * block, device=q.device)
    # the keys key_keep drops (the anchor's sinks, padding), per batch row: only their columns are masked
    dropped = None if key_keep is None else [(~row.to(torch.bool)).nonzero().squeeze(1) for row in key_keep]
    scores = []
    for start in range(0, n_qb, chunk):
        stop = min(start + chunk, n_qb)
        sel = rows[start:stop].reshape(-1)  # (c * s,)
        # causal: no sampled query of the chunk sees past its last block's last query, so those key blocks are skipped
        n_pooled = -(-min(max(min(stop * block, Lq) + offset, 1), Lk) // block) if causal else n_kb
        qs = q[:, :, sel].float().mul_(scale).view(B, Hkv, G * len(sel), D)
        logits = torch.matmul(qs, keys[:, :, :n_pooled * block].transpose(-1, -2)).view(B, Hkv, G, len(sel), -1)
        # the columns before `first` are seen by every sampled query of the chunk (causal: up to its
        # first sampled query's limit; bidirectional: every real key), so only the ones after are masked
        first = 0 if window else max(min(start * block + offset + 1, Lk), 0) if causal else Lk
        seen = visible(sel, key_pos[first:n_pooled * block].view(1, 1, -1), Lk, causal, offset, window, None)
        logits[..., first:].masked_fill_(~seen[:, None, None], -math.inf)
        for b, columns in enumerate(dropped or ()):
            logits[b].index_fill_(-1, columns[columns < n_pooled * block], -math.inf)
        pooled = logits.view(B, Hkv, G, len(sel), n_pooled, block).amax(-1)
        share = torch.softmax(pooled, dim=-1).nan_to_num_(0.0)  # a sampled query seeing nothing: 0 everywhere
        share = F.pad(share, (0, n_kb - n_pooled))  # key blocks past the chunk's last query: none of them sees
        share = share.view(B, Hkv, G, -1, samples, n_kb)
        share = share.amax(dim=4)  # over the samples, then (sharing) over the query heads: two fast reductions
        scores.append(share.amax(dim=2) if kv_heads_share else share.view(B, Hq, -1, n_kb))
    return torch.cat(scores, dim=2)


def choose_blocks(q: Tensor, k: Tensor, *, scale: float, block: int, top_blocks: int, samples: int,
                  causal: bool = False, offset: int = 0, window: int = 0, key_keep: Tensor | None = None,
                  kv_heads_share: bool = False) -> Tensor:
    """(B, Hs, query blocks, top_blocks) int64: each query block's chosen key blocks (-1: none),
    per kv head (Hs = Hkv) with `kv_heads_share`, else per query head (Hs = Hq)."""
    scores = block_scores(q, k, scale=scale, block=block, samples=samples, causal=causal, offset=offset,
                          window=window, key_keep=key_keep, kv_heads_share=kv_heads_share)
    chosen = topk_lowest_index(scores, min(top_blocks, scores.shape[-1]), dim=-1)
    return torch.where(scores.gather(-1, chosen) > 0, chosen, -1)


# The choice as one op: a graph holding it (the compile backend's, torch.export's) traces with a
# symbolic length, where the chunk loop above would put a guard on the length and specialise to it.
@torch.library.custom_op("attnpass::choose_blocks", mutates_args=())
def choose_blocks_op(q: Tensor, k: Tensor, key_keep: Optional[Tensor], scale: float, block: int, top_blocks: int,
                     samples: int, causal: bool, offset: int, window: int, kv_heads_share: bool) -> Tensor:
    """`choose_blocks` (the same arguments, positionally)."""
    return choose_blocks(q, k, scale=scale, block=block, top_blocks=top_blocks, samples=samples, causal=causal,
                         offset=offset, window=window, key_keep=key_keep, kv_heads_share=kv_heads_share)


@choose_blocks_op.register_fake
def _(q, k, key_keep, scale, block, top_blocks, samples, causal, offset, window, kv_heads_share):
    heads = k.shape[1] if kv_heads_share else q.shape[1]
    key_blocks = (k.shape[2] + block - 1) // block
    return q.new_empty((q.shape[0], heads, (q.shape[2] + block - 1) // block, torch.sym_min(top_blocks, key_blocks)),
                       dtype=torch.int64)


def block_positions(chosen: Tensor, block: int, len_k: int) -> Tensor:
    """(B, Hq, nq, top_blocks * block) key positions of the chosen blocks (-1: none)."""
    positions = chosen[..., None] * block + torch.arange(block, device=chosen.device)
    return torch.where((chosen[..., None] >= 0) & (positions < len_k), positions, -1).flatten(-2)


def query_groups(len_q: int, block: int, batch: int, heads: int, device=None) -> Tensor:
    """(B, Hq, nq, block) query positions of each query block (-1 past the last query)."""
    queries = torch.arange(-(-len_q // block) * block, device=device).view(-1, block)
    return torch.where(queries < len_q, queries, -1).expand(batch, heads, -1, -1)


def groups_to_csr(q_index: Tensor, k_index: Tensor, len_q: int, len_k: int, *, causal: bool = False,
                  offset: int = 0, window: int = 0, key_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The pairs a block layout computes as CSR over the B * Hq * Lq query rows (for the measuring
    tools: every query's row holds its group's keys that the causal rule, band and padding allow)."""
    B, Hq, n_qb, block = q_index.shape
    slots = k_index[:, :, :, None, :].expand(-1, -1, -1, block, -1).reshape(B, Hq, n_qb * block, -1)[:, :, :len_q]
    seen = visible(torch.arange(len_q, device=k_index.device), slots, len_k, causal, offset, window, key_keep)
    return csr_from_slots(torch.where(seen, slots, -1).reshape(B * Hq * len_q, -1))
