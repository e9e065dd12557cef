"""Attention sinks and a local window, added to any method's own pairs (options `sinks=`, `local=`).

A pretrained LM puts much of its attention on the first tokens (attention sinks) and on the
nearest ones; a content-based method that misses them loses the model's quality. With these
options a site computes, under ONE softmax, three disjoint sets of pairs of query i:

- sinks: the first `sinks` real keys of its batch row (left padding skipped), when not in the window;
- local (causal sites only): the `local` keys ending at its own position, j in (i + off - local, i + off];
- the method's own pairs, with the method run on the rest: keys that are not sinks (its key_keep
  drops them) and, causal, at most i + off - local (its layout offset, `SiteAttention.layout_offset`).

Each part is computed by a kernel that also returns its rows' logsumexp; the parts are merged by
their logsumexp, which is exactly the softmax over their union. A part's row can be empty (a
query near the start has no method keys); kernels give it output 0 and statistic 0, which is
indistinguishable from a real row, so every part runs with a column of ones appended to v: that
column is the row's probability mass, 0 exactly when the row is empty.

Only a softmax merges this way: a method run with an entmax-1.5 normaliser refuses these options.
Nothing of size Lq x Lk is built: the sinks part is (queries, sinks), the local part groups of
`_QUERIES_PER_GROUP` queries over their shared (group + local) keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnpass.lowering.cpu.grouped_attention import grouped_attention
from attnpass.methods.options import check_int

ANCHOR_OPTIONS = ("sinks", "local")
_QUERIES_PER_GROUP = 64


def check_anchor_options(method: str, options: dict) -> None:
    for name in ANCHOR_OPTIONS:
        if options.get(name) is not None:
            check_int(method, name, options[name], 0)
    if Anchor.from_options(options) and options.get("normalizer", "softmax") != "softmax":
        raise ValueError(f"method {method!r}: sinks= and local= merge parts of one softmax; they need "
                         f"normalizer='softmax', got normalizer={options['normalizer']!r}")


def anchor_reason(spec, options: dict) -> str | None:
    """Why the anchor options cannot serve this site (a window needs the causal order), or None."""
    if options.get("local") and (spec.cross or not spec.causal):
        return ("local= is a window of the keys before each query, defined for causal self-attention; "
                "this site is " + ("cross-attention" if spec.cross else "bidirectional") + " (use sinks= only)")
    return None


@dataclass(frozen=True)
class Anchor:
    sinks: int = 0
    local: int = 0

    @classmethod
    def from_options(cls, options: dict) -> Anchor:
        return cls(int(options.get("sinks") or 0), int(options.get("local") or 0))

    def __bool__(self) -> bool:
        return self.sinks > 0 or self.local > 0

    def __str__(self) -> str:
        return f"sinks={self.sinks}, local={self.local}"

    def sink_positions(self, key_keep: Tensor | None, batch: int, len_k: int, device) -> Tensor:
        """(B, sinks) positions of each batch row's first `sinks` keys, counted from its first real key."""
        first = torch.zeros(batch, 1, dtype=torch.int64, device=device) if key_keep is None \
            else key_keep.to(torch.int8).argmax(dim=-1, keepdim=True)
        pos = first + torch.arange(self.sinks, device=device)
        return torch.where(pos < len_k, pos, -1).expand(batch, -1)

    def method_key_keep(self, key_keep: Tensor | None, batch: int, len_k: int, device) -> Tensor | None:
        """The key_keep the method runs with: the site's, without the sinks."""
        if not self.sinks:
            return key_keep
        keep = torch.ones(batch, len_k, dtype=torch.bool, device=device) if key_keep is None else key_keep.clone()
        sinks = self.sink_positions(key_keep, batch, len_k, device)
        return keep.scatter_(1, sinks.clamp(min=0), sinks < 0)  # a -1 slot writes True at 0: no change

    def parts(self, q: Tensor, k: Tensor, v_mass: Tensor, *, key_keep, bias, mask, scale: float, causal: bool,
              offset: int, dropout_p: float, dropout_seed: int) -> list[tuple[Tensor, Tensor]]:
        """The sinks and local parts as (out (B, Hq, Lq, Dv + 1), logsumexp (B, Hq, Lq)), v_mass being
        `with_mass(v)`; `offset` is the site's own causal offset."""
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        dev = q.device
        groups = -(-Lq // _QUERIES_PER_GROUP)
        query = torch.arange(groups * _QUERIES_PER_GROUP, device=dev).view(groups, _QUERIES_PER_GROUP)
        q_index = torch.where(query < Lq, query, -1).expand(B, Hq, -1, -1)
        common = {"scale": scale, "key_padding_mask": key_keep, "bias": bias, "pair_mask": mask,
                  "dropout_p": dropout_p, "dropout_seed": dropout_seed}
        parts = []
        if self.sinks:
            sinks = self.sink_positions(key_keep, B, Lk, dev).view(B, 1, 1, -1).expand(B, Hq, groups, -1)
            # causal: a sink inside the query's window is the local part's, so stop at i + off - local
            parts.append(_read_slots(grouped_attention(
                q, k, v_mass, q_index, sinks, causal=causal, causal_offset=offset - self.local, **common), Lq))
        if self.local:
            # group g's keys: the union of its queries' windows; each query held to its own by key_range
            first_key = query[:, :1] + offset - self.local + 1
            keys = first_key + torch.arange(_QUERIES_PER_GROUP + self.local - 1, device=dev)
            k_index = torch.where((keys >= 0) & (keys < Lk), keys, -1).expand(B, Hq, -1, -1)
            key_range = torch.stack([query + offset - self.local + 1, query + offset], dim=-1).expand(B, Hq, -1, -1, -1)
            parts.append(_read_slots(grouped_attention(
                q, k, v_mass, q_index, k_index, causal=True, causal_offset=offset, key_range=key_range, **common), Lq))
        return parts


def _read_slots(result: tuple[Tensor, Tensor], len_q: int) -> tuple[Tensor, Tensor]:
    """Groups of consecutive queries back to (B, H, Lq, ...): query i sits in slot i."""
    out_slots, stat = result
    B, H = out_slots.shape[:2]
    return out_slots.reshape(B, H, -1, out_slots.shape[-1])[:, :, :len_q], stat.reshape(B, H, -1)[:, :, :len_q]


def with_mass(v: Tensor) -> Tensor:
    """v with a column of ones appended: a part's output there is its rows' probability mass."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def merge_parts(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """One softmax over the union of disjoint parts, from each part's (out with mass column,
    logsumexp); rows empty in every part give zeros, as dense attention's kernels do."""
    outs = [out for out, _ in parts]
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    # An empty row has statistic 0 and mass 0 exactly; a real row's mass is 1 (or, under dropout,
    # its kept share, which can be 0 only if the statistic is not also exactly 0 by chance).
    lse = torch.stack([torch.where((out[..., -1] != 0) | (stat != 0), stat.to(acc), -math.inf)
                       for out, stat in parts])
    top = lse.amax(dim=0)
    empty = torch.isinf(top)
    weight = torch.exp(lse - top.masked_fill(empty, 0.0))          # (parts, B, H, Lq), 0 for empty
    total = weight.sum(dim=0).clamp(min=torch.finfo(acc).tiny)
    out = sum(w.unsqueeze(-1) * o[..., :-1].to(acc) for w, o in zip(weight, outs)) / total.unsqueeze(-1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0).to(outs[0].dtype)


def scatter_merge(out_slots: Tensor, stat_slots: Tensor, q_index: Tensor, len_q: int) -> tuple[Tensor, Tensor]:
    """A query's slots in several groups (routing's clusters) merged as one softmax over their
    pairs (a key two of its groups share counts twice): (out with mass column, logsumexp) per query.

    out_slots (B, H, G, W, Dv + 1) from `with_mass` values, stat_slots (B, H, G, W), q_index (B, H, G, W)."""
    B, H, G, W, Dm = out_slots.shape
    acc = torch.float64 if out_slots.dtype == torch.float64 else torch.float32
    nonempty = (q_index >= 0) & ((out_slots[..., -1] != 0) | (stat_slots != 0))
    lse = torch.where(nonempty, stat_slots.to(acc), -math.inf).view(B, H, -1)
    where = q_index.clamp(min=0).view(B, H, -1)
    top = torch.full((B, H, len_q), -math.inf, dtype=acc, device=out_slots.device).scatter_reduce(
        2, where, lse, "amax")
    top = top.masked_fill(torch.isinf(top), 0.0)
    weight = torch.exp(lse - top.gather(2, where))                 # 0 at empty slots
    total = torch.zeros(B, H, len_q, dtype=acc, device=out_slots.device).scatter_add(2, where, weight)
    summed = torch.zeros(B, H, len_q, Dm, dtype=acc, device=out_slots.device).scatter_add(
        2, where.unsqueeze(-1).expand(-1, -1, -1, Dm), weight.unsqueeze(-1) * out_slots.view(B, H, -1, Dm).to(acc))
    filled = total > 0
    out = torch.where(filled.unsqueeze(-1), summed / total.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1), 0.0)
    stat = torch.where(filled, top + total.clamp(min=torch.finfo(acc).tiny).log(), 0.0)
    return out.to(out_slots.dtype), stat
