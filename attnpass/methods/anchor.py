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
`_QUERIES_PER_GROUP` queries over their shared (group + local) keys. At inference (no gradient
asked, no dropout, no bias or mask tensor) a causal site computes sinks and window together as one
part on CPU SDPA's flash kernel, which returns the logsumexp too (`_anchor_flash`); training takes
the grouped kernel, whose statistic has a gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnpass.lowering.torch.common import positions_mask
from attnpass.lowering.torch.grouped_attention import grouped_attention
from attnpass.methods.options import check_int
from attnpass.methods.symbolic import view_merged

ANCHOR_OPTIONS = ("sinks", "local")
_QUERIES_PER_GROUP = 64
_FLASH_QUERIES_PER_CHUNK = 128


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
        keep = torch.ones(batch, len_k, dtype=torch.bool, device=device) if key_keep is None else key_keep
        return keep & ~positions_mask(self.sink_positions(key_keep, batch, len_k, device), len_k)

    def runs_on_flash(self, bias, mask, dropout_p: float, *tensors: Tensor) -> bool:
        """Whether `parts` computes the sinks and the window as one part on the flash op
        (`anchor_flash`): inference on CPU (the op is CPU's flash kernel) with a window (causal sites),
        no bias or mask tensor, no dropout, no gradient asked of `tensors`."""
        return (bool(self.local) and bias is None and mask is None and not dropout_p
                and all(t.device.type == "cpu" for t in tensors) and not _needs_grad(*tensors))

    def parts(self, q: Tensor, k: Tensor, v_mass: Tensor, *, key_keep, bias, mask, scale: float, causal: bool,
              offset: int, dropout_p: float, dropout_seed: int, band: int = 0) -> list[tuple[Tensor, Tensor]]:
        """The sinks and local parts as (out (B, Hq, Lq, Dv + 1), logsumexp (B, Hq, Lq)), v_mass being
        `with_mass(v)`; `offset` is the site's own causal offset. At a causal band site (`band` w > 0:
        query i sees only keys j > i + offset - w) both parts keep to the band: the window is at most
        w keys, and a sink is seen only while inside the band."""
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        dev = q.device
        local = min(self.local, band) if band else self.local
        sinks_seen = self.sinks and not (band and local >= band)  # else the window is the whole band
        if self.runs_on_flash(bias, mask, dropout_p, q, k, v_mass):
            sinks = self.sink_positions(key_keep, B, Lk, dev) if sinks_seen else None
            return [tuple(anchor_flash(q, k, v_mass, key_keep, scale, offset, local, sinks, band))]
        groups = -(-Lq // _QUERIES_PER_GROUP)
        query = torch.arange(groups * _QUERIES_PER_GROUP, device=dev).view(groups, _QUERIES_PER_GROUP)
        q_index = torch.where(query < Lq, query, -1).expand(B, Hq, -1, -1)
        common = {"scale": scale, "key_padding_mask": key_keep, "bias": bias, "pair_mask": mask,
                  "dropout_p": dropout_p, "dropout_seed": dropout_seed}
        parts = []
        if sinks_seen:
            sinks = self.sink_positions(key_keep, B, Lk, dev).view(B, 1, 1, -1).expand(B, Hq, groups, -1)
            # causal: a sink inside the query's window is the local part's, so stop at i + off - local
            parts.append(_read_slots(grouped_attention(
                q, k, v_mass, q_index, sinks, causal=causal, causal_offset=offset - local,
                window=band - local if band else 0, **common), Lq))
        if local:
            # group g's keys: the union of its queries' windows; each query held to its own by key_range
            first_key = query[:, :1] + offset - local + 1
            keys = first_key + torch.arange(_QUERIES_PER_GROUP + local - 1, device=dev)
            k_index = torch.where((keys >= 0) & (keys < Lk), keys, -1).expand(B, Hq, -1, -1)
            key_range = torch.stack([query + offset - local + 1, query + offset], dim=-1).expand(B, Hq, -1, -1, -1)
            parts.append(_read_slots(grouped_attention(
                q, k, v_mass, q_index, k_index, causal=True, causal_offset=offset, key_range=key_range, **common), Lq))
        return parts


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _anchor_flash(q: Tensor, k: Tensor, v: Tensor, key_keep: Tensor | None, scale: float, offset: int,
                  local: int, sinks: Tensor | None, band: int = 0) -> tuple[Tensor, Tensor]:
    """Sinks and local window as one part on CPU SDPA's flash kernel, which also returns the
    logsumexp (inference only: that output has no gradient). Queries in chunks; chunk n's keys are
    the sinks (B, s) and the union of its queries' windows, gathered once per kv head (the query
    heads sharing it are stacked along the query axis); a mask holds each query to its own window
    and to the sinks before it."""
    B, Hq, Lq, D = q.shape
    v = v[..., :-1]  # the flash kernel takes v's head size equal to q's: the mass column is rebuilt below
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    # chunks shorter than the window: a chunk computes (chunk + local - 1) keys per query for `local` used
    group, chunk = Hq // Hkv, min(local, _FLASH_QUERIES_PER_CHUNK)
    chunks = -(-Lq // chunk)
    dev = q.device
    # window slot t of chunk n is position n * chunk + offset - local + 1 + t
    window = (torch.arange(chunks, device=dev).view(-1, 1) * chunk + offset - local + 1
              + torch.arange(chunk + local - 1, device=dev).view(1, -1)).expand(B, chunks, -1)
    r = torch.arange(chunk, device=dev).view(1, 1, chunk, 1)
    t = torch.arange(chunk + local - 1, device=dev).view(1, 1, 1, -1)
    in_window = (t >= r) & (t <= r + local - 1)                                        # (1, 1, chunk, W)
    pos, allowed = window, in_window
    if sinks is not None:
        # a sink is seen while it is before the query's window: position <= i + offset - local
        sink_pos = sinks.view(B, 1, -1).expand(B, chunks, -1)
        query_pos = torch.arange(chunks, device=dev).view(1, -1, 1, 1) * chunk + r + offset
        before = sink_pos.unsqueeze(2) <= query_pos - local                           # (B, chunks, chunk, s)
        if band:  # and while inside the site's band
            before = before & (sink_pos.unsqueeze(2) > query_pos - band)
        pos, allowed = torch.cat([sink_pos, window], dim=-1), torch.cat([before, in_window.expand(B, chunks, -1, -1)], -1)
    width = pos.shape[-1]
    valid = (pos >= 0) & (pos < Lk)
    index = pos.clamp(0, Lk - 1)                                                      # (B, chunks, width)
    allowed = allowed & valid.unsqueeze(2)
    if key_keep is not None:
        allowed = allowed & key_keep.gather(1, index.reshape(B, -1)).view(B, chunks, 1, width)
    allowed = allowed.expand(B, chunks, chunk, width)

    def gather_rows(x: Tensor) -> Tensor:  # (B, Hkv, Lk, d) -> (B * chunks, Hkv, width, d)
        rows = x.gather(2, index.view(B, 1, -1, 1).expand(B, Hkv, -1, x.shape[3]))
        return rows.view(B, Hkv, chunks, width, -1).transpose(1, 2).reshape(B * chunks, Hkv, width, -1)

    q_pad = torch.nn.functional.pad(q, (0, 0, 0, chunks * chunk - Lq))
    q_chunks = q_pad.view(B, Hkv, group, chunks, chunk, D).permute(0, 3, 1, 2, 4, 5).reshape(
        B * chunks, Hkv, group * chunk, D)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=dev).masked_fill_(~allowed, -math.inf)
    bias = bias.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(-1, 1, group * chunk, width)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_chunks, gather_rows(k), gather_rows(v), 0.0, False, attn_mask=bias, scale=scale)
    # the mass column: 1 where the row has an allowed key; an empty row's output and statistic are
    # set to 0 (the kernels' convention), whatever the flash kernel leaves there
    filled = allowed.any(-1)                                                          # (B, chunks, chunk)
    filled = filled.view(B, 1, 1, chunks, chunk).expand(B, Hkv, group, chunks, chunk).reshape(B, Hq, -1)
    out = out.view(B, chunks, Hkv, group, chunk, Dv).permute(0, 2, 3, 1, 4, 5).reshape(B, Hq, chunks * chunk, Dv)
    lse = lse.view(B, chunks, Hkv, group, chunk).permute(0, 2, 3, 1, 4).reshape(B, Hq, chunks * chunk)
    out = torch.cat([out.masked_fill(~filled.unsqueeze(-1), 0.0), filled.unsqueeze(-1).to(out.dtype)], dim=-1)
    lse = torch.where(filled, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32), 0.0)
    # contiguous, as the op's fake kernel states its outputs (Inductor checks the strides)
    return out[:, :, :Lq].contiguous(), lse[:, :, :Lq].contiguous()


# An op with a fake kernel stating its shapes, so a call with symbolic lengths traces (torch.export,
# torch.compile) without guards from its chunking, which reads the lengths.
anchor_flash = torch.library.custom_op("attnpass::anchor_flash", _anchor_flash, mutates_args=())


@anchor_flash.register_fake
def _(q, k, v, key_keep, scale, offset, local, sinks, band=0):
    B, Hq, Lq, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, Hq, Lq, v.shape[3]), q.new_empty(B, Hq, Lq, dtype=stat)


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
    # (views through one flat dim: a traced call's symbolic G and W)
    lse = view_merged(torch.where(nonempty, stat_slots.to(acc), -math.inf), B, H, G * W)
    where = view_merged(q_index.clamp(min=0), B, H, G * W)
    top = torch.full((B, H, len_q), -math.inf, dtype=acc, device=out_slots.device).scatter_reduce(
        2, where, lse, "amax")
    top = top.masked_fill(torch.isinf(top), 0.0)
    weight = torch.exp(lse - top.gather(2, where))                 # 0 at empty slots
    total = torch.zeros(B, H, len_q, dtype=acc, device=out_slots.device).scatter_add(2, where, weight)
    summed = torch.zeros(B, H, len_q, Dm, dtype=acc, device=out_slots.device).scatter_add(
        2, where.unsqueeze(-1).expand(-1, -1, -1, Dm), weight.unsqueeze(-1) * view_merged(out_slots, B, H, G * W, Dm).to(acc))
    filled = total > 0
    out = torch.where(filled.unsqueeze(-1), summed / total.clamp(min=torch.finfo(acc).tiny).unsqueeze(-1), 0.0)
    stat = torch.where(filled, top + total.clamp(min=torch.finfo(acc).tiny).log(), 0.0)
    return out.to(out_slots.dtype), stat
