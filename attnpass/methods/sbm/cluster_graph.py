"""SBM's deterministic inference graph (option ``eval_graph="clusters"``): hard clusters, no sampling.

The sampled graph (`sbm.sampling`) is the paper's, but it is drawn from a seeded torch.Generator
that no other runtime reproduces (ONNX has no Poisson sampler, and a different sampler is a
different graph). This rule picks edges from the same model quantities, deterministically and
without forming the Lq x Lk edge probabilities P = Y_Q B Y_K^T:

1. each real key j goes to its dominant cluster V(j) = argmax_v Y_K[j, v] (ties: lowest index);
2. the expected number of sampled edges from query i into the keys of hard cluster V is exact and
   cheap: m_i(V) = sum_{j in V} P_ij = Y_Q[i] B Z_V^T with Z_V = sum_{j in V} Y_K[j]
   (O(L k^2), no pair is formed). Causal rules are ignored in this ranking (per-query prefix sums
   would cost O(L k^2) memory); invisible keys are dropped afterwards;
3. query i attends to every key of its `eval_clusters` hard clusters of largest m_i (ties: lowest
   index) that the causal rule and padding allow, plus the key at its own position (the sampling
   rule's fallback key, `sbm.sampling.fallback_keys`), so no row is empty.

Work is O(L k^2 + edges); the edges are the keys of the chosen clusters, i.e. the method's own
cost (a cluster holding most keys makes the graph dense, as a dense P would make the sampled one).
The ONNX body (`lowering/onnx/sbm.py`) computes the same graph from the same formulas.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnpass.lowering.torch.common import csr_rows
from attnpass.lowering.torch.edge_attention import edges_from_pairs
from attnpass.methods.sbm.sampling import SBMGraph, fallback_keys
from attnpass.methods.sparsefinder.predictors import expand_groups


def top_mass_clusters(y_q: Tensor, y_k: Tensor, block: Tensor, top: int,
                      key_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(query clusters (N, Lq, top), key clusters (N, Lk)) of the rule above.

    y_q (N, Lq, k), y_k (N, Lk, k) (zero rows at padding keys), block (N, k, k); key_keep (N, Lk)
    bool or None. Padding keys get cluster -1.
    """
    k = y_q.shape[-1]
    key_cluster = y_k.argmax(dim=-1)                                        # first maximum on ties
    if key_keep is not None:
        key_cluster = torch.where(key_keep, key_cluster, -1)
    real_rows = y_k if key_keep is None else y_k * key_keep.unsqueeze(-1).to(y_k.dtype)
    # Z_V = sum of the memberships of the keys in hard cluster V, without a (N, Lk, k) one-hot
    z = torch.zeros(y_k.shape[0], k, k, dtype=y_k.dtype, device=y_k.device)
    z.scatter_add_(1, key_cluster.clamp(min=0).unsqueeze(-1).expand_as(real_rows), real_rows)  # (N, V, k)
    mass = (y_q @ block) @ z.transpose(1, 2)                                # (N, Lq, V): m_i(V)
    # stable descending order: equal masses go to the lowest cluster index, as ONNX TopK does
    order = torch.argsort(-mass, dim=-1, stable=True)
    return order[..., :top], key_cluster


def cluster_graph(y_q: Tensor, y_k: Tensor, block: Tensor, *, top: int, heads: int, causal: bool,
                  causal_offset: int, key_keep: Tensor | None) -> SBMGraph:
    """The deterministic graph as an SBMGraph (no edge is a sample: `sampled` is all False).

    y_q (N, Lq, k) with N = B*heads, y_k (N, Lk, k), block (N, k, k), key_keep (B, Lk) or None.
    """
    N, Lq, k = y_q.shape
    Lk = y_k.shape[1]
    dev = y_q.device
    keep_n = None if key_keep is None else key_keep.repeat_interleave(heads, dim=0)
    y_q, y_k = (torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0) for y in (y_q, y_k))
    q_clusters, key_cluster = top_mass_clusters(y_q, y_k, block, top, keep_n)

    n = torch.arange(N, device=dev).view(N, 1)
    q_group = (n.unsqueeze(-1) * k + q_clusters).reshape(-1)
    q_row = (n * Lq + torch.arange(Lq, device=dev)).unsqueeze(-1).expand(N, Lq, top).reshape(-1)
    real = key_cluster >= 0
    k_group = (n * k + key_cluster)[real]
    k_col = torch.arange(Lk, device=dev).expand(N, Lk)[real]
    row, col = expand_groups(q_group, q_row, k_group, k_col, N * k)
    if causal:
        ok = col <= row % Lq + causal_offset
        row, col = row[ok], col[ok]

    own = fallback_keys(Lq, Lk, causal, causal_offset, key_keep)              # (B or 1, Lq)
    own = own.repeat_interleave(heads, dim=0) if key_keep is not None else own.expand(N, -1)
    has_own = own.reshape(-1) >= 0
    own_row = torch.arange(N * Lq, device=dev)[has_own]
    row = torch.cat([row, own_row])
    col = torch.cat([col, own.reshape(-1)[has_own]])
    row_ptr, col_index = edges_from_pairs(row, col, N * Lq)
    edge_row = csr_rows(row_ptr, col_index.numel())
    return SBMGraph(row_ptr, col_index, edge_row, sampled=torch.zeros_like(col_index, dtype=torch.bool))
