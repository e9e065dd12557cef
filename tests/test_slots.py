"""attnpass.methods.slots.bucket_slots (routing's cluster members, Combiner's block queries) against a
row-by-row definition."""
from __future__ import annotations

import pytest
import torch

from attnpass.methods.slots import bucket_slots


@pytest.mark.parametrize("num_buckets, n", [(5, 40), (7, 3), (1, 6), (4, 0)])
def test_bucket_slots_equal_the_definition(num_buckets, n):
    g = torch.Generator().manual_seed(n)
    # skewed ids (some buckets empty, one large), with two leading dims
    bucket = (torch.rand(2, 3, n, generator=g) ** 3 * num_buckets).long()
    table, slot = bucket_slots(bucket, num_buckets)
    rows = [[[[i for i, b in enumerate(bucket[x, y].tolist()) if b == want] for want in range(num_buckets)]
              for y in range(3)] for x in range(2)]
    width = max([len(r) for plane in rows for row in plane for r in row] + [1])  # the largest bucket anywhere
    assert table.shape == (2, 3, num_buckets, width)
    for x in range(2):
        for y in range(3):
            assert table[x, y].tolist() == [r + [-1] * (width - len(r)) for r in rows[x][y]]
            assert slot[x, y].tolist() == [b * width + rows[x][y][b].index(i) for i, b in enumerate(bucket[x, y].tolist())]
