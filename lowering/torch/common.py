"""Pieces the CPU kernels share: input checks, reading a broadcast bias / mask at pairs, the row of
each CSR entry, and the counter-based dropout mask."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

_MASK32 = 0xFFFFFFFF


def check(op: str, condition: bool, message: str, error: type = ValueError) -> None:
    """Raise `error("<op>: <message>")` unless `condition` holds."""
    if not condition:
        raise error(f"{op}: {message}")


def broadcastable(shape, target) -> bool:
    """Can a tensor of `shape` broadcast to `target` (without growing `target`)? (A symbolic size is
    taken as 1 only where that is known, so a traced call puts no guard on it.)"""
    return len(shape) <= len(target) and all(
        statically_known_true(s == 1) or s == t for s, t in zip(reversed(shape), reversed(target)))


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): floating, one dtype and device, Hq % Hkv == 0."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(op, t.dim() == 4, f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        check(op, t.is_floating_point(), f"{name} must be floating point, got {t.dtype}", TypeError)
        check(op, t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    check(op, q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    B, Hq, _, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    check(op, k.shape[0] == B and v.shape[0] == B, f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    check(op, k.shape[3] == D, f"q and k head dims differ: {D} vs {k.shape[3]}")
    check(op, v.shape[1] == Hkv and v.shape[2] == Lk,
          f"k (B, Hkv, Lk, D) = {tuple(k.shape)} and v {tuple(v.shape)} disagree on Hkv or Lk")
    check(op, Hkv > 0 and Hq % Hkv == 0, f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")


def as_4d(t: Tensor) -> Tensor:
    """A tensor broadcastable to (B, H, Lq, Lk) with its leading size-1 dims added (a view)."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def pair_index(shape, coords: tuple) -> tuple:
    """Index tuple reading a 4-D tensor of `shape` at pairs (b, h, i, j) given as int64 tensors that
    broadcast together; broadcast (size-1) dims read index 0.

    Indexing the caller's tensor directly, never an expanded copy, keeps it O(pairs) even when a
    bias broadcasts to Lq x Lk. The zero index is expanded (stride 0) to the pairs' shape, not 0-d:
    a 0-d tensor index becomes a select (a view of the whole remaining tensor), this way every dim is
    a plain per-pair gather (and the same tuple scatters gradients back).
    """
    zero = coords[0].new_zeros(()).expand(torch.broadcast_shapes(*(c.shape for c in coords)))
    return tuple(c if size != 1 else zero for c, size in zip(coords, shape))


def read_at_pairs(t: Tensor, coords: tuple) -> Tensor:
    """`t` (broadcastable to (B, H, Lq, Lk)) read at the pairs `coords` (see `pair_index`)."""
    t4 = as_4d(t)
    return t4[pair_index(t4.shape, coords)]


def csr_ptr(counts: Tensor) -> Tensor:
    """The row_ptr (R + 1,) of a CSR structure whose rows hold `counts` (R,) entries each."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def csr_rows(row_ptr: Tensor, nnz: int | None = None) -> Tensor:
    """The row of every entry of a CSR structure (entries stored row after row): row_ptr (R + 1,)
    -> (nnz,) int64. Give nnz (col_index.numel()) when known: the output size is then not read
    back from the device."""
    return torch.repeat_interleave(row_ptr.diff(), output_size=nnz)


def _mix32(x):
    """32-bit avalanche mix (murmur3-finaliser shape) on Python ints or int64 tensors in [0, 2**32).

    The multipliers are odd (so each step is a bijection) and below 2**31, so int64 products never
    overflow.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & _MASK32
    return x ^ (x >> 16)


def dropout_keep(seed: int, p: float, coords: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """Inverted-dropout multiplier (0 or 1/(1-p)) for each pair, as a hash of (seed, *coords).

    `coords` are int64 tensors that broadcast together (e.g. row, query position, key column), each
    value below 2**32. Hashing the coordinates instead of drawing from a generator makes the mask a
    pure function of the seed and the pair: independent of chunking and edge order, regenerated
    exactly in backward, and the same recipe a GPU kernel uses (Philox-style seed + offset).
    Pass coordinates from the smallest shape to the largest: the early mixes stay small.
    """
    x = _mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    for c in coords:
        x = _mix32(x ^ (c & _MASK32))
    return (x >= int(p * 2**32)).to(dtype) / (1.0 - p)


def positions_mask(positions: Tensor, length: int) -> Tensor:
    """(B, length) bool: True at the positions (B, n) given; -1 slots are counted as nothing, never
    written (a scatter of their clamped index 0 could overwrite a real position 0)."""
    hits = torch.zeros(positions.shape[0], length, dtype=torch.int32, device=positions.device)
    return hits.scatter_add_(1, positions.clamp(min=0), (positions >= 0).to(torch.int32)) > 0
