"""attnpass.methods.slots.bucket_slots (routing's cluster members, Combiner's block queries) against a
row-by-row definition."""
from __future__ import annotations

import pytest
import torch

from attnpass.methods.slots import bucket_slots


def _definition(bucket: list[int], num_buckets: int) -> tuple[list[list[int]], list[int]]:
    rows = [[n for n, b in enumerate(bucket) if b == want] for want in range(num_buckets)]
    width = max([len(r) for r in rows] + [1])
    slot = [b * width + rows[b].index(n) for n, b in enumerate(bucket)]
    return [r + [-1] * (width - len(r)) for r in rows], slot


@pytest.mark.parametrize("num_buckets, n", [(5, 40), (7, 3), (1, 6), (4, 0)])
def test_bucket_slots_equal_the_definition(num_buckets, n):
    g = torch.Generator().manual_seed(n)
    # skewed ids (some buckets empty, one large), with two leading dims
    bucket = (torch.rand(2, 3, n, generator=g) ** 3 * num_buckets).long()
    table, slot = bucket_slots(bucket, num_buckets)
    for i in range(2):
        for j in range(3):
            rows, where = _definition(bucket[i, j].tolist(), num_buckets)
            width = max([len([b for b in bucket[i, j].tolist() if b == want]) for want in range(num_buckets)] + [1])
            assert table[i, j, :, :width].tolist() == [r[:width] for r in rows]
            assert (table[i, j, :, width:] == -1).all()  # wider only for another row's larger bucket
            assert slot[i, j].tolist() == [s // width * table.shape[-1] + s % width for s in where]


@pytest.mark.parametrize("offset", [-10, -2, 0])
def test_combiner_queries_by_position_with_queries_before_every_key(offset):
    """Combiner's table of the queries at each key position: queries whose position lies before the
    keys (a causal offset below -i) are in no row, down to none at all."""
    from attnpass.methods.combiner.layout import queries_by_position

    table = queries_by_position(3, 5, True, offset)
    expected = [[pos - offset] if 0 <= pos - offset < 3 else [-1] for pos in range(5)]  # query i at i + offset
    assert table.tolist() == expected
