"""The three CPU kernels compute the same function on the same pairs — dropout included: each
hashes the pair (b*H + h, i, j) with the seed, so a sparse kernel covering every pair equals the
canonical dense op bit for bit in what it keeps."""
from __future__ import annotations

import pytest
import torch

import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention
from attnpass.lowering.torch.edge_attention import edge_attention
from attnpass.lowering.torch.grouped_attention import grouped_attention

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 7, 9, 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, LQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, LK, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, LK, 3, generator=g, dtype=torch.float64)
    keep = torch.ones(B, LK, dtype=torch.bool)
    keep[1, -3:] = False
    return q, k, v, keep


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_and_edge_kernels_on_all_pairs_equal_the_dense_op(dropout_p, causal):
    q, k, v, keep = _inputs()
    dense = torch.ops.attnpass.attention(q, k, v, None, None, keep, 0.4, causal, 2, dropout_p, 1234)
    # one group holding every query and every key
    q_index = torch.arange(LQ).expand(B, HQ, 1, LQ)
    k_index = torch.arange(LK).expand(B, HQ, 1, LK)
    slots, _ = grouped_attention(q, k, v, q_index, k_index, scale=0.4, causal=causal, causal_offset=2,
                                 key_padding_mask=keep, dropout_p=dropout_p, dropout_seed=1234)
    torch.testing.assert_close(slots[:, :, 0], dense, rtol=1e-10, atol=1e-12)
    # every pair as an edge
    rows = B * HQ * LQ
    row_ptr = torch.arange(rows + 1) * LK
    col_index = torch.arange(LK).repeat(rows)
    edges, _ = edge_attention(q, k, v, row_ptr, col_index, scale=0.4, causal=causal, causal_offset=2,
                              key_padding_mask=keep, dropout_p=dropout_p, dropout_seed=1234)
    torch.testing.assert_close(edges, dense, rtol=1e-10, atol=1e-12)
    if dropout_p:
        clean = torch.ops.attnpass.attention(q, k, v, None, None, keep, 0.4, causal, 2, 0.0, 0)
        assert not torch.allclose(dense, clean), "dropout had no effect"
