"""Top-k with ties broken to the lowest index, as ONNX TopK breaks them.

torch.topk's order among equal values is unspecified (it differs between CPU builds and from
ONNX Runtime's), so a selection over exact ties (identical padding tokens, identical keys) would make
the PyTorch model and its ONNX export choose different members. Only rows whose k-th and (k+1)-th
largest values are equal can differ: torch.topk takes the k+1 largest, which shows them, and only
those rows are selected again exactly, on int64 keys that pack each float32
value (mapped to an int32 that orders as the float does) over its reversed position, so every key
is distinct and among equal values the lowest position ranks first (float64 rows take a stable sort:
no room for the position next to a 64-bit key).

The selection is the op ``attnpass::topk_lowest_index``: which rows are ambiguous is data, so traced
(torch.export, torch.compile) it stays one node with a fake kernel, and the ONNX export writes it as
the standard TopK, whose ties already go to the lowest index.
"""
from __future__ import annotations

import torch
from torch import Tensor

_LOW31 = 0x7FFFFFFF


def topk_lowest_index(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """Indices of the `k` largest values of `x` along `dim` (in no particular order), equal values
    taken lowest index first. NaNs are not supported."""
    return torch.ops.attnpass.topk_lowest_index(x, k, dim % x.dim())


@torch.library.custom_op("attnpass::topk_lowest_index", mutates_args=())
def _topk_lowest_index_op(x: Tensor, k: int, dim: int) -> Tensor:
    if k == 0 or k >= x.shape[dim]:
        return x.topk(k, dim=dim, sorted=False).indices.contiguous()
    # the k+1 largest, ordered: a row is ambiguous iff its k-th and (k+1)-th largest values are equal
    values, chosen = x.topk(k + 1, dim=dim, sorted=False)
    values, order = values.movedim(dim, -1).sort(dim=-1, descending=True)
    chosen = chosen.movedim(dim, -1).gather(-1, order)[..., :k]
    ambiguous = values[..., k - 1] == values[..., k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)
        chosen[rows] = _exact(x.movedim(dim, -1)[rows], k)
    return chosen.movedim(-1, dim).contiguous()  # as the fake kernel states it


def _exact(rows: Tensor, k: int) -> Tensor:
    """(n, L) -> (n, k): the lowest-index top-k of each row."""
    if rows.dtype == torch.float64:
        return torch.argsort(rows, dim=-1, descending=True, stable=True)[:, :k]
    # + 0.0 turns -0.0 into +0.0 (equal values must get equal keys); half types convert exactly
    bits = (rows.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    # IEEE floats order as sign-magnitude integers: flip the magnitude of negatives to get two's complement
    ordered = bits ^ ((bits >> 31) & _LOW31)
    # value in the high 32 bits, L-1-position below: distinct keys, equal values lowest position first
    rank = torch.arange(rows.shape[-1] - 1, -1, -1, dtype=torch.int64, device=rows.device)
    keys = (ordered.to(torch.int64) << 32) | rank
    return keys.topk(k, dim=-1, sorted=False).indices


@_topk_lowest_index_op.register_fake
def _(x: Tensor, k: int, dim: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = k
    return x.new_empty(shape, dtype=torch.int64)
