"""Which (query, key) pairs a method computes, as dense bool masks: for measurement only.

Each method answers `SiteAttention.computed_pairs` from its own layout; `group_pairs` turns the
grouped form (groups of query and key slots) into a (..., Lq, Lk) mask (the CSR form has
`lowering.torch.edge_attention.edges_to_dense_mask`). It builds L x L tensors on purpose (calibration,
fidelity, tests), never on the attention path.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_pairs"]


def group_pairs(q_index: Tensor, k_index: Tensor, len_q: int, len_k: int, key_range: Tensor | None = None) -> Tensor:
    """(..., Lq, Lk) bool from groups (..., G, Wq) / (..., G, Wk): every query slot of group g with
    every key slot of g (-1 = empty); with key_range (..., G, Wq, 2), a query slot only with keys
    whose position is in [low, high]."""
    lead = q_index.shape[:-2]
    q_index, k_index = q_index.reshape(-1, *q_index.shape[-2:]), k_index.reshape(-1, *k_index.shape[-2:])
    N, G, Wq = q_index.shape
    Wk = k_index.shape[-1]
    qi = q_index.view(N, G, Wq, 1).expand(N, G, Wq, Wk)
    ki = k_index.view(N, G, 1, Wk).expand(N, G, Wq, Wk)
    keep = (qi >= 0) & (ki >= 0)
    if key_range is not None:
        key_range = key_range.reshape(N, G, Wq, 2)
        keep &= (ki >= key_range[..., :1]) & (ki <= key_range[..., 1:])
    n = torch.arange(N, device=q_index.device).view(N, 1, 1, 1).expand(N, G, Wq, Wk)
    out = torch.zeros(N, len_q, len_k, dtype=torch.bool, device=q_index.device)
    out[n[keep], qi[keep], ki[keep]] = True
    return out.view(*lead, len_q, len_k)
