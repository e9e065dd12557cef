"""Top-k with ties to the lowest index (ONNX TopK's rule), which torch.topk does not promise."""
from __future__ import annotations

import pytest
import torch

from attnpass.lowering.torch.ordered_topk import topk_lowest_index


def _reference(x, k, dim):
    return torch.argsort(x, dim=dim, descending=True, stable=True).narrow(dim, 0, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [-1, 1])
def test_equal_values_are_taken_lowest_index_first(dtype, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 200, 5, generator=g).to(dtype)
    x[:, ::7] = 1.0            # many exact ties around the cut
    x[:, 3:40:5] = -0.0        # -0.0 equals +0.0
    x[:, 4:40:5] = 0.0
    x[:, 100:110] = -torch.inf
    if dim == -1:
        x = x.transpose(1, 2)  # the same rows along the last dim (not contiguous)
    for k in (1, 20, 35, 120, 200):
        got = topk_lowest_index(x, k, dim).sort(dim).values
        want = _reference(x, k, dim).sort(dim).values
        assert torch.equal(got, want), (dtype, dim, k)


def test_many_equal_values_at_the_cut_go_to_the_lowest_positions():
    # 143 equal maxima for 50 slots (torch.topk's CPU build picks other ones of them here)
    x = torch.zeros(4, 3, 1000)
    x[..., ::7] = 1.0
    ours = topk_lowest_index(x, 50).sort(-1).values
    assert torch.equal(ours, _reference(x, 50, -1).sort(-1).values)
    assert torch.equal(ours[..., :3], torch.tensor([0, 7, 14]).expand(4, 3, 3))


def test_without_ties_it_is_topks_set():
    x = torch.randn(6, 513, generator=torch.Generator().manual_seed(1))
    assert torch.equal(topk_lowest_index(x, 64).sort(-1).values, x.topk(64).indices.sort(-1).values)
