"""Items laid out by bucket as rows of a -1 padded table: the grouped kernel's slot form.

Routing lays out each cluster's member queries this way, Combiner each block's queries; both are
`bucket_slots` of the items' bucket ids.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnpass.methods.symbolic import read_size

__all__ = ["bucket_slots"]


def bucket_slots(bucket: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    """Items 0 .. N-1 of each leading index, by bucket: bucket (..., N) ids in [0, num_buckets) ->
    (table (..., num_buckets, W), slot (..., N)). Row b of the table holds the items of bucket b in
    index order, -1 past them; W is the largest bucket's size (at least 1). slot[..., n] = b * W + r
    is where item n sits in the flattened table (r: its rank within its bucket)."""
    N = bucket.shape[-1]
    counts = torch.zeros(*bucket.shape[:-1], num_buckets, dtype=torch.int64, device=bucket.device)
    counts.scatter_add_(-1, bucket, torch.ones_like(bucket))
    # the largest bucket, a size kept symbolic when traced; no leading index: nothing to lay out
    width = read_size(counts.max().clamp(min=1), 1, max(N, 1)) if counts.numel() else 1
    sorted_bucket, order = torch.sort(bucket, dim=-1, stable=True)  # equal buckets stay in index order
    starts = counts.cumsum(-1) - counts
    rank = torch.arange(N, device=bucket.device) - starts.gather(-1, sorted_bucket)
    sorted_slot = sorted_bucket * width + rank
    table = torch.full((*bucket.shape[:-1], num_buckets * width), -1, dtype=torch.int64, device=bucket.device)
    table.scatter_(-1, sorted_slot, order)
    slot = torch.empty_like(sorted_slot).scatter_(-1, order, sorted_slot)
    return table.view(*bucket.shape[:-1], num_buckets, width), slot
