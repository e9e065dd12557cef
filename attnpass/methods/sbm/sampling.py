"""Sampling an SBM attention graph without forming the Lq x Lk edge-probability matrix.

SBM attention (Cho et al. 2022) draws, per head, an adjacency A ~ Bernoulli(P) with
P = Y_Q B Y_K^T: memberships Y_Q (Lq x k), Y_K (Lk x k) in (0, 1) and a block matrix B (k x k, entries
summing to 1), so every P_ij <= 1. Forming P costs Lq*Lk; this module samples the graph in time
linear in the number of edges instead, the fastRG way (Rohe, Tao, Han & Rohe 2018):

    with cx = column sums of Y_Q, cy = column sums of Y_K and S = diag(cx) B diag(cy),
    P = (Y_Q / cx) S (Y_K / cy)^T, so a Poisson(P) multigraph is drawn as
      m ~ Poisson(sum S) edges;  each edge's cluster pair (u, v) ~ S / sum S;
      its query i ~ Y_Q[:, u] / cx_u;  its key j ~ Y_K[:, v] / cy_v.

Each pair (i, j) then carries an independent Poisson(P_ij) number of edges, so after merging
duplicates the graph has edge (i, j) with probability 1 - exp(-P_ij) (= P_ij to first order; the
exact law is what the statistical test checks). All N = B*H heads are sampled together: every
categorical draw is an inverse-CDF lookup (`searchsorted`) in one float64 cumulative sum over the
concatenated distributions, so there is no per-head or per-cluster Python loop.

Also here: the straight-through estimator that lets the attention's gradient reach Y_Q, B and Y_K
through the sampled edges only (`EdgeProbabilitySTE`), and the expected edge density used by the
density regulariser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnpass.lowering.torch.common import csr_ptr, csr_rows
from attnpass.lowering.torch.edge_attention import edges_from_pairs
from attnpass.methods.base import key_anchor

def block_matrix(clusters: Tensor) -> Tensor:
    """(H, k, D) cluster embeddings -> (H, k, k) block matrix: softmax over all k*k entries of C C^T."""
    H, k, _ = clusters.shape
    logits = clusters @ clusters.transpose(-1, -2)
    return torch.softmax(logits.reshape(H, k * k), dim=-1).view(H, k, k)


def _categorical(cdf: Tensor, start: Tensor, mass: Tensor, size: int, u: Tensor) -> Tensor:
    """Draw from the distributions laid end to end in `cdf` (a float64 inclusive cumsum).

    Draw e picks from the block [start[e], start[e] + size): the value at `start + u * mass` (mass
    = the block's total) is looked up; the clamp guards the last ulp at block ends. Returns the
    index inside the block.
    """
    base = torch.where(start > 0, cdf[(start - 1).clamp(min=0)], torch.zeros_like(mass))
    pos = torch.searchsorted(cdf, base + u * mass, right=True)
    return (torch.minimum(torch.maximum(pos, start), start + size - 1) - start)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def expected_edge_count(y_q: Tensor, y_k: Tensor, block: Tensor, floor: float = 0.0,
                        key_keep: Tensor | None = None) -> float:
    """The expected number of edges `sample_edge_pairs` draws (duplicates included) for these
    arguments: sum_ij P_ij = sum over heads of cx B cy^T, plus the floor's rate on every real pair.
    O(N * (Lq + Lk) * k); it is the size of the draw's arrays, known before any is allocated."""
    cx, cy = y_q.double().sum(1), y_k.double().sum(1)                  # (N, k)
    expected = float((cx.unsqueeze(2) * block.double() * cy.unsqueeze(1)).sum())
    if floor > 0:
        real = y_k.shape[0] * y_k.shape[1] if key_keep is None else int(key_keep.sum())
        expected += floor * y_q.shape[1] * real
    return expected


def sample_edge_pairs(y_q: Tensor, y_k: Tensor, block: Tensor, generator: torch.Generator,
                      floor: float = 0.0, key_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A Poisson multigraph with E[#edges(i, j)] = P_ij (+ floor), for N independent heads.

    y_q (N, Lq, k), y_k (N, Lk, k) memberships (padding keys must have zero rows), block (N, k, k).
    `floor` adds a uniform Erdos-Renyi part with rate `floor` on every (query, real key) pair
    (`key_keep` (N, Lk) bool names the real keys; None = all). Returns (row, col): row = n*Lq + i
    in [0, N*Lq), col = j in [0, Lk); duplicates included (merge them with `edges_from_pairs`).

    The edge count of each cluster pair is drawn directly, Poisson(S_nuv) (the same law as a
    Poisson total split multinomially), so edges come out grouped by (head, u, v): every query
    endpoint of a group is looked up in the same column of Y_Q, and the key endpoints are drawn
    in (head, v, u) order, grouped by their column of Y_K, then moved to their edges. Grouped
    lookups hit the same few cache lines; scattered ones are several times slower.
    """
    N, Lq, k = y_q.shape
    Lk = y_k.shape[1]
    device = y_q.device
    y_q, y_k, block = y_q.double(), y_k.double(), block.double()
    cx, cy = y_q.sum(1), y_k.sum(1)                                   # (N, k)
    S = cx.unsqueeze(2) * block * cy.unsqueeze(1)                     # (N, k, k); sum = sum_ij P_ij
    counts = torch.poisson(S, generator=generator).long()             # (N, u, v)
    M = int(counts.sum())
    u = torch.rand(2, M, generator=generator, dtype=torch.float64, device=device)

    # queries: edges in (n, u, v) order are grouped by their Y_Q column (n, u)
    q_block = torch.repeat_interleave(torch.arange(N * k, device=device), counts.sum(2).reshape(-1), output_size=M)
    q_cols = y_q.transpose(1, 2).reshape(-1).cumsum(0)                # (N*k*Lq,) column blocks of Y_Q
    i = _categorical(q_cols, q_block * Lq, cx.reshape(-1)[q_block], Lq, u[0])

    # keys: drawn in (n, v, u) order (grouped by Y_K column), then put in (n, u, v) order
    counts_t = counts.transpose(1, 2).reshape(-1)
    k_block = torch.repeat_interleave(torch.arange(N * k, device=device), counts.sum(1).reshape(-1), output_size=M)
    k_cols = y_k.transpose(1, 2).reshape(-1).cumsum(0)
    j_t = _categorical(k_cols, k_block * Lk, cy.reshape(-1)[k_block], Lk, u[1])
    segment = torch.repeat_interleave(torch.arange(N * k * k, device=device), counts.reshape(-1), output_size=M)
    within = torch.arange(M, device=device) - _exclusive_cumsum(counts.reshape(-1))[segment]
    n, uv = segment // (k * k), segment % (k * k)
    start_t = _exclusive_cumsum(counts_t).view(N, k, k)               # (n, v, u) segment starts
    j = j_t[start_t[n, uv % k, uv // k] + within]
    row, col = n * Lq + i, j

    if floor > 0:
        keep = torch.ones(N, Lk, dtype=torch.bool, device=y_q.device) if key_keep is None else key_keep
        real = keep.sum(1)                                            # (N,)
        extra = torch.poisson(floor * Lq * real.double(), generator=generator).long()
        fn = torch.repeat_interleave(torch.arange(N, device=y_q.device), extra)
        fi = (torch.rand(fn.numel(), generator=generator, dtype=torch.float64, device=y_q.device) * Lq).long()
        rank = (torch.rand(fn.numel(), generator=generator, dtype=torch.float64, device=y_q.device)
                * real[fn]).long()
        # the rank-th real key of head n: real positions first, in order (stable sort of ~keep)
        real_pos = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        row = torch.cat([row, fn * Lq + fi.clamp(max=Lq - 1)])
        col = torch.cat([col, real_pos[fn, rank.clamp(max=Lk - 1)]])
    return row, col


@dataclass
class SBMGraph:
    """One call's sampled attention graph, in the edge kernel's CSR form (rows r = n*Lq + i)."""

    row_ptr: Tensor    # (N*Lq + 1,)
    col_index: Tensor  # (nnz,) key position of each edge, sorted within a row
    edge_row: Tensor   # (nnz,) the row of each edge
    sampled: Tensor    # (nnz,) bool: True = drawn from P; False = the one edge given to an otherwise empty row

    @property
    def nnz(self) -> int:
        return self.col_index.numel()


def fallback_keys(len_q: int, len_k: int, causal: bool, offset: int, key_keep: Tensor | None) -> Tensor:
    """(Nb, Lq) key each query falls back on when it drew no edge, -1 = none (Nb = key_keep's rows or 1).

    Its own position in key space (causal: i + offset, the last key it may see; otherwise
    floor(i * Lk / Lq)); with padding, the nearest real key at or before it, else (not causal)
    the first real key after it.
    """
    i = torch.arange(len_q, device=key_keep.device if key_keep is not None else None)
    anchor = key_anchor(i, len_q, len_k, causal, offset)
    if key_keep is None:
        return torch.where(anchor >= 0, anchor, -1).unsqueeze(0)
    pos = torch.arange(len_k, device=key_keep.device).expand_as(key_keep)
    last_real = torch.cummax(torch.where(key_keep, pos, -1), dim=1).values              # (Nb, Lk)
    next_real = torch.flip(torch.cummin(torch.flip(torch.where(key_keep, pos, len_k), [1]), dim=1).values, [1])
    a = anchor.clamp(min=0).expand(key_keep.shape[0], -1)
    before = last_real.gather(1, a)
    key = before if causal else torch.where(before >= 0, before, next_real.gather(1, a))
    key = torch.where((anchor >= 0) & (key < len_k), key, -1)
    return key


def sample_graph(y_q: Tensor, y_k: Tensor, block: Tensor, generator: torch.Generator, *, heads: int,
                 causal: bool, causal_offset: int, key_keep: Tensor | None, floor: float = 0.0) -> SBMGraph:
    """Sample, drop the pairs the causal rule forbids, merge duplicates, and give each query that
    drew nothing one edge to its own position (see `fallback_keys`), marked as not sampled.

    y_q (N, Lq, k) with N = B*heads, y_k (N, Lk, k) (zero rows at padding keys), block (N, k, k),
    key_keep (B, Lk) or None.
    """
    N, Lq, _ = y_q.shape
    Lk = y_k.shape[1]
    keep_n = None if key_keep is None else key_keep.repeat_interleave(heads, dim=0)
    row, col = sample_edge_pairs(y_q, y_k, block, generator, floor, keep_n)
    if causal:
        allowed = col <= row % Lq + causal_offset
        row, col = row[allowed], col[allowed]
    row_ptr, col_index = edges_from_pairs(row, col, N * Lq)

    drew = row_ptr.diff() > 0
    fallback = fallback_keys(Lq, Lk, causal, causal_offset, key_keep)                  # (B or 1, Lq)
    fallback = fallback.repeat_interleave(heads, dim=0) if key_keep is not None else fallback.expand(N, -1)
    need = (~drew) & (fallback.reshape(-1) >= 0)
    counts = row_ptr.diff()
    edge_row = csr_rows(row_ptr, col_index.numel())
    if bool(need.any()):
        # the rows that get a fallback edge have none, so it is an insertion into the CSR (no re-sort):
        # each old edge moves by the number of fallback edges in the rows before its own
        new_ptr = csr_ptr(counts + need)
        merged = col_index.new_empty(int(new_ptr[-1]))
        merged[new_ptr[edge_row] + torch.arange(col_index.numel(), device=row_ptr.device) - row_ptr[edge_row]] = col_index
        extra_row = need.nonzero().squeeze(1)
        merged[new_ptr[extra_row]] = fallback.reshape(-1)[extra_row]
        row_ptr, col_index = new_ptr, merged
        edge_row = csr_rows(row_ptr, col_index.numel())
    return SBMGraph(row_ptr, col_index, edge_row, sampled=drew[edge_row])


class EdgeProbabilitySTE(torch.autograd.Function):
    """Straight-through estimator for the sampled adjacency (Cho et al. 2022, Eq. 8).

    Forward: a zero additive logit per edge (the edge weight A_e = 1, i.e. log A_e = 0), to be
    passed to the edge kernel as `edge_bias`. Backward: the kernel's gradient for it is
    dL/d log A_e = dL/dA_e at A_e = 1, and the estimator sets dL/dP_e = hardtanh(A_e * dL/dA_e) on
    sampled edges (0 elsewhere), then back-propagates P_e = Y_Q[i] B Y_K[j]^T to the memberships and
    the block matrix with sparse-times-dense products (torch.sparse.mm), O(nnz * k + L * k^2), never
    Lq x Lk.
    """

    @staticmethod
    def forward(ctx, y_q: Tensor, y_k: Tensor, block: Tensor, edge_row: Tensor, col_index: Tensor,
                sampled: Tensor) -> Tensor:
        ctx.save_for_backward(y_q, y_k, block, edge_row, col_index, sampled)
        return y_q.new_zeros(col_index.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        y_q, y_k, block, edge_row, col_index, sampled = ctx.saved_tensors
        N, Lq, k = y_q.shape
        Lk = y_k.shape[1]
        g = torch.clamp(grad, -1.0, 1.0) * sampled.to(grad.dtype)
        key_row = (edge_row // Lq) * Lk + col_index
        # G (the sparse dL/dP) as one block-diagonal (N*Lq, N*Lk) matrix; its (row, key) pairs are
        # unique and sorted by row, i.e. already coalesced. torch.sparse.mm is ~10x faster here than
        # gathering an (edges, k) block and scattering it back.
        G = torch.sparse_coo_tensor(torch.stack([edge_row, key_row]), g.to(y_q.dtype), (N * Lq, N * Lk),
                                    is_coalesced=True, check_invariants=False)
        T = torch.sparse.mm(G, y_k.reshape(N * Lk, k)).view(N, Lq, k)      # G Y_K
        U = torch.sparse.mm(G.t(), y_q.reshape(N * Lq, k)).view(N, Lk, k)  # G^T Y_Q
        d_yq = T @ block.transpose(-1, -2)          # dP/dY_Q = G Y_K B^T
        d_yk = U @ block                            # dP/dY_K = G^T Y_Q B
        d_block = y_q.transpose(-1, -2) @ T         # dP/dB   = Y_Q^T G Y_K
        return d_yq, d_yk, d_block, None, None, None


def expected_density(y_q: Tensor, y_k: Tensor, block: Tensor, *, causal: bool, causal_offset: int,
                     key_keep: Tensor | None, heads: int) -> Tensor:
    """Mean over heads of E[edges] / allowed pairs (`head_densities`)."""
    return head_densities(y_q, y_k, block, causal=causal, causal_offset=causal_offset, key_keep=key_keep,
                          heads=heads).mean()


def head_densities(y_q: Tensor, y_k: Tensor, block: Tensor, *, causal: bool, causal_offset: int,
                   key_keep: Tensor | None, heads: int) -> Tensor:
    """(N,): each head's E[edges] / allowed pairs, i.e. sum of P over allowed pairs / their count.

    Differentiable and O(L * k^2): sum_ij P_ij = cx^T B cy; under causal, row i sums P against the
    prefix sum of Y_K up to i + offset. (The fallback edges and the merge of duplicates are left
    out: this is the density of the model's P, which is what the regulariser controls.)
    """
    N, Lq, k = y_q.shape
    Lk = y_k.shape[1]
    if key_keep is None:
        real_upto = torch.arange(1, Lk + 1, device=y_q.device).expand(N, Lk)
    else:
        real_upto = key_keep.long().cumsum(1).repeat_interleave(heads, dim=0)             # (N, Lk)
    if not causal:
        mass = torch.einsum("nu,nuv,nv->n", y_q.sum(1), block, y_k.sum(1))
        pairs = Lq * real_upto[:, -1]
    else:
        last = (torch.arange(Lq, device=y_q.device) + causal_offset).clamp(max=Lk - 1)    # (Lq,)
        visible = last >= 0
        prefix = y_k.cumsum(1)[:, last.clamp(min=0)] * visible.view(1, Lq, 1)             # (N, Lq, k)
        mass = torch.einsum("niu,nuv,niv->n", y_q, block, prefix)
        pairs = (real_upto[:, last.clamp(min=0)] * visible).sum(1)
    return mass / pairs.clamp(min=1)
