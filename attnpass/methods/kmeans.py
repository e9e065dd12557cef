"""Online k-means for routing attention (Roy et al. 2021): per-head centroids learnt by EMA.

Routing attention puts each query and key in the clusters whose centroids it resembles most,
then attends only inside clusters. This module holds the clustering state and its maths; the
attention itself lives in `routing.py`. The state's first draw and EMA step (`register_state`,
`start_`, `ema_step_`) are also Sparsefinder's clustering predictor's, which keeps the same buffers
on its own module and assigns tokens to their nearest centroid by distance in its projected space.

State (persistent buffers, so it is saved and loaded with the model's `state_dict()`):

    centroids    (H, c, D)  the routing centroids, mu = ema_sum / (ema_count + eps)
    ema_sum      (H, c, D)  EMA of the sum of the tokens assigned to each cluster
    ema_count    (H, c)     EMA of the number of tokens assigned to each cluster
    initialized  ()         bool; False until the first batch has been seen

H is the number of (routing) query heads: every query head has its own centroids, and the
tokens it clusters are its own queries plus the keys of the kv head it reads (GQA).

Everything is done on normalised tokens x_hat = layer_norm(x) (no affine parameters, the
paper's routing normalisation), which lie near a sphere of radius sqrt(D). Similarity is
x_hat . mu, and a token's "nearest" centroid is its most similar one: the same score routing
ranks by, so the clusters the EMA learns are the ones routing uses.

Under torch.distributed (e.g. DDP), the first batch's centroids are broadcast from rank 0 and every
EMA step all-reduces the per-cluster token counts and sums, so each step uses every rank's tokens
and all replicas hold the same centroids without relying on DDP's buffer broadcast.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnpass.lowering.torch.ordered_topk import topk_lowest_index
from attnpass.methods.slots import bucket_slots
from attnpass.methods.symbolic import view_merged


def _distributed() -> bool:
    """True inside an initialised torch.distributed process group (state updates are then synchronised)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Tokens(NamedTuple):
    """One set of normalised tokens seen by each query head."""

    x_hat: Tensor              # (B, H, L, D) normalised tokens, one row per query head
    keep: Tensor | None     # (B, L) bool, True = real token (None: all real)
    nearest: Tensor | None  # (B, H, L) int64 index of each token's nearest centroid


def cells(nearest: Tensor, clusters: int) -> Tensor:
    """(B, H, L) nearest centroids -> flat row of each token's (head, cluster) in (H * c, ...) tables."""
    head = torch.arange(nearest.shape[1], device=nearest.device).view(1, -1, 1)
    return (head * clusters + nearest).reshape(-1)


def register_state(owner: nn.Module, heads: int, clusters: int, dim: int) -> None:
    """The k-means state's persistent buffers on `owner` (see the module docstring): the names
    are the state_dict keys of routing's OnlineKMeans and of Sparsefinder's clustering predictor."""
    owner.register_buffer("centroids", torch.zeros(heads, clusters, dim))
    owner.register_buffer("ema_sum", torch.zeros(heads, clusters, dim))
    owner.register_buffer("ema_count", torch.zeros(heads, clusters))
    owner.register_buffer("initialized", torch.tensor(False))


@torch.no_grad()
def start_(owner: nn.Module, pool: Tensor, lowest_draws: bool = False) -> None:
    """Centroids := distinct random tokens of `pool` (H, N, D) per head (torch's global RNG).

    Tokens are drawn with replacement only when a head has fewer than c. Every token gets a
    uniform draw and the c largest are kept (`lowest_draws`: the c smallest, Sparsefinder's rule,
    so a seed gives each method the centroids it always had; either is a uniformly random
    c-subset). The EMA starts as if each centroid had been seen once (count 1), so a cluster that
    gets no token keeps its centroid instead of collapsing to 0 at the first update. An empty pool
    leaves the state uninitialised.
    """
    H, N, _ = pool.shape
    if N == 0:
        return
    c = owner.centroids.shape[1]
    if N >= c:
        draws = torch.rand(H, N, device=pool.device)
        picks = draws.argsort(dim=-1)[:, :c] if lowest_draws else draws.topk(c, dim=-1).indices
    else:
        every = torch.rand(H, N, device=pool.device).argsort(dim=-1)
        extra = torch.randint(0, N, (H, c - N), device=pool.device)
        picks = torch.cat([every, extra], dim=-1)
    chosen = pool.gather(1, picks.unsqueeze(-1).expand(H, c, pool.shape[2]))
    if _distributed():
        # every rank starts from rank 0's draw, so the replicas' centroids agree from step one
        torch.distributed.broadcast(chosen, src=0)
    owner.centroids.copy_(chosen)
    owner.ema_sum.copy_(chosen)
    owner.ema_count.fill_(1.0)
    owner.initialized.fill_(True)


@torch.no_grad()
def ema_step_(owner: nn.Module, token_sets: list[Tokens], decay: float, eps: float) -> None:
    """One EMA k-means step from each real token's nearest centroid (`Tokens.nearest`):

    count <- decay * count + (1 - decay) * n;  sum <- decay * sum + (1 - decay) * sum_x;
    mu = sum / (count + eps). Done in float32 at least, whatever the tokens' dtype.
    """
    acc = torch.promote_types(owner.ema_sum.dtype, torch.float32)
    n, sum_x = cluster_sums(owner.centroids, token_sets, acc)
    if _distributed():
        # data parallel: the step uses the tokens of every rank's batch (like SyncBatchNorm), so
        # all replicas make the same update and their centroids stay identical
        torch.distributed.all_reduce(n)
        torch.distributed.all_reduce(sum_x)
    count = owner.ema_count.to(acc) * decay + n * (1 - decay)
    total = owner.ema_sum.to(acc) * decay + sum_x * (1 - decay)
    owner.ema_count.copy_(count)
    owner.ema_sum.copy_(total)
    owner.centroids.copy_(total / (count + eps).unsqueeze(-1))


def cluster_sums(centroids: Tensor, token_sets: list[Tokens], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(count (H, c), sum (H, c, D)) of the real, finite tokens assigned to each centroid, in `dtype`.

    Padding and non-finite tokens (a broken input) take part with weight 0, so one broken batch
    cannot poison the state. Screening every token for finiteness costs several passes over
    (B, H, L, D), more than the sums themselves, so the sums are taken first and the screened
    pass runs only when they come out non-finite (a non-finite token always makes its sum so).
    """
    H, c, D = centroids.shape
    device = centroids.device

    def sums(screen: bool) -> tuple[Tensor, Tensor]:
        n = torch.zeros(H * c, dtype=dtype, device=device)
        sum_x = torch.zeros(H * c, D, dtype=dtype, device=device)
        for tokens in token_sets:
            B, _, L, _ = tokens.x_hat.shape
            cell = cells(tokens.nearest, c)
            x = tokens.x_hat.detach().to(dtype)
            weight = None if tokens.keep is None else tokens.keep.to(dtype).view(B, 1, L).expand(B, H, L)
            if screen:
                finite = torch.isfinite(x).all(-1)
                weight = finite.to(dtype) if weight is None else weight * finite
                x = torch.where(finite.unsqueeze(-1), x, 0.0)
            if weight is None:
                n.index_add_(0, cell, torch.ones(cell.shape, dtype=dtype, device=device))
                sum_x.index_add_(0, cell, x.reshape(-1, D))
            else:
                n.index_add_(0, cell, weight.reshape(-1))
                sum_x.index_add_(0, cell, x.reshape(-1, D) * weight.reshape(-1, 1))
        return n.view(H, c), sum_x.view(H, c, D)

    n, sum_x = sums(screen=False)
    if not bool(torch.isfinite(sum_x).all()):
        n, sum_x = sums(screen=True)
    return n, sum_x


class OnlineKMeans(nn.Module):
    def __init__(self, heads: int, clusters: int, dim: int, *, decay: float = 0.999,
                 commitment: float = 1e-4, eps: float = 1e-5):
        super().__init__()
        self.heads, self.clusters, self.dim = heads, clusters, dim
        self.decay, self.commitment, self.eps = decay, commitment, eps
        register_state(self, heads, clusters, dim)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, clusters={self.clusters}, dim={self.dim}, decay={self.decay}, "
                f"commitment={self.commitment}")

    # ---------------------------------------------------------------------------------------
    # Routing scores
    # ---------------------------------------------------------------------------------------

    @staticmethod
    def normalise(x: Tensor) -> Tensor:
        """layer_norm without affine parameters, in at least float32 (bf16 would blur routing)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        return F.layer_norm(x.to(acc), (x.shape[-1],))

    def similarity(self, q_hat: Tensor, k_hat: Tensor, centroids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scores x_hat . mu: q_hat (B, H, Lq, D) -> (B, H, c, Lq); k_hat (B, Hkv, Lk, D) -> (B, H, c, Lk).

        Query head h scores the keys of kv head h // (H // Hkv) against its own centroids; the
        keys are not copied per query head. `centroids` (B, H, c, D), e.g. from `refit`, replaces the
        state's for this call.
        """
        mu = (self.centroids if centroids is None else centroids).to(q_hat.dtype)
        sim_q = torch.matmul(mu, q_hat.transpose(-1, -2))
        B, Hkv, Lk, D = k_hat.shape
        grouped_mu = mu.reshape(mu.shape[:-3] + (Hkv, self.heads // Hkv, self.clusters, D))
        sim_k = torch.matmul(grouped_mu, k_hat.transpose(-1, -2).unsqueeze(2))  # (B, Hkv, g, c, Lk)
        return sim_q, sim_k.reshape(B, self.heads, self.clusters, Lk)

    @torch.no_grad()
    def refit(self, token_sets: list[Tokens], steps: int) -> Tensor:
        """(B, H, c, D): the state's centroids after `steps` Lloyd steps on this call's tokens, each
        batch row on its own: every token to its most similar centroid, each centroid to the mean of its
        real, finite tokens (one that gets none keeps its place). The state is not changed. Centroids
        fitted on other text can leave most of a prompt's tokens in a few clusters; a few steps on the
        prompt's own tokens spread them as the prompt's clusters are. Every (batch row, head) is its own
        table of cells, so the steps run on the whole batch at once (and trace with a symbolic batch)."""
        acc = torch.promote_types(token_sets[0].x_hat.dtype, torch.float32)
        B, H = token_sets[0].x_hat.shape[:2]
        c, D = self.clusters, self.centroids.shape[-1]
        tokens = []
        for t in token_sets:  # non-finite tokens (a broken input) and padding weigh 0
            x = t.x_hat.detach().to(acc)
            finite = torch.isfinite(x).all(dim=-1)
            weight = finite.to(acc) if t.keep is None else finite.to(acc) * t.keep.to(acc).unsqueeze(1)
            tokens.append((torch.where(finite.unsqueeze(-1), x, 0.0), weight))
        first_cell = torch.arange(B * H, device=self.centroids.device).view(B, H, 1) * c
        mu = self.centroids.to(acc).expand(B, H, c, D)
        for _ in range(steps):
            n = torch.zeros(B * H * c, dtype=acc, device=mu.device)
            total = torch.zeros(B * H * c, D, dtype=acc, device=mu.device)
            for x, weight in tokens:
                cell = view_merged(first_cell + self.nearest(torch.matmul(mu, x.transpose(-1, -2))), -1)
                n.index_add_(0, cell, view_merged(weight, -1))
                total.index_add_(0, cell, view_merged(x * weight.unsqueeze(-1), -1, D))
            n, total = n.view(B, H, c), total.view(B, H, c, D)
            mu = torch.where(n.unsqueeze(-1) > 0, total / n.clamp(min=1).unsqueeze(-1), mu)
        return mu.contiguous()

    @staticmethod
    def nearest(sim: Tensor) -> Tensor:
        """(B, H, c, L) scores -> (B, H, L) index of each token's most similar centroid."""
        # max(dim).indices, not argmax: over a non-last dim argmax takes a ~2.5x slower CPU path
        return sim.max(dim=-2).indices

    def cells(self, nearest: Tensor) -> Tensor:
        """(B, H, L) nearest centroids -> flat row of each token's (head, cluster) in (H * c, ...) tables."""
        return cells(nearest, self.clusters)

    @staticmethod
    def top_slots(sim: Tensor, width: int, keep: Tensor | None = None, drop_unkept: bool = True,
                  widths: Tensor | None = None) -> Tensor:
        """Each cluster's `width` most similar tokens: (B, H, c, L) scores -> (B, H, c, width) positions.

        Tokens with keep False rank after every kept token; with drop_unkept they are never
        chosen (their slots become -1). Equal scores go to the lowest position first. `widths`
        (B, H, c), each at most `width`: cluster c takes only its widths[c] most similar. Slots are
        sorted by original position, -1 slots last.
        """
        L = sim.shape[-1]
        if keep is not None:
            sim = sim.masked_fill(~keep[:, None, None, :], -torch.inf)
        chosen = topk_lowest_index(sim, width)  # ties to the lowest position, as ONNX TopK
        if keep is not None and drop_unkept:
            kept = keep[:, None, None, :].expand(sim.shape).gather(-1, chosen)
            chosen = torch.where(kept, chosen, L)  # L sorts after every real position
        if widths is not None:  # rank the chosen (by score, equal scores lowest position first), keep the first
            chosen = chosen.sort(dim=-1).values
            score = sim.gather(-1, chosen.clamp(max=L - 1)).masked_fill(chosen == L, -torch.inf)
            by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices
            chosen = chosen.gather(-1, by_score)
            chosen = torch.where(torch.arange(width, device=sim.device) < widths.unsqueeze(-1), chosen, L)
        chosen = chosen.sort(dim=-1).values
        return chosen.masked_fill(chosen == L, -1)

    @staticmethod
    def member_slots(nearest: Tensor, clusters: int) -> Tensor:
        """Each cluster's members: (B, H, L) nearest centroids -> (B, H, c, W) positions, sorted by
        position, -1 slots last; W is the largest cluster's size (every token in exactly one row)."""
        return bucket_slots(nearest, clusters)[0]

    # ---------------------------------------------------------------------------------------
    # State updates
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_(self, token_sets: list[Tokens]) -> None:
        """Centroids := distinct random real tokens of this batch, per head (`start_`)."""
        pool = torch.cat([self._rows(t, real_only=True) for t in token_sets], dim=1)  # (H, N, D)
        if pool.shape[1] == 0:  # a batch of padding only: any token beats an uninitialised centroid
            pool = torch.cat([self._rows(t, real_only=False) for t in token_sets], dim=1)
        start_(self, pool)  # nothing finite at all: stays uninitialised until a usable batch comes

    @staticmethod
    def _rows(tokens: Tokens, real_only: bool) -> Tensor:
        """(B, H, L, D) tokens -> (H, N, D): the (real) tokens of every batch row, per head."""
        B, H, L, D = tokens.x_hat.shape
        rows = tokens.x_hat.detach().transpose(0, 1).reshape(H, B * L, D)
        # a NaN / inf token (a broken input) must never become a centroid
        usable = torch.isfinite(rows).all(-1).all(0)
        if tokens.keep is not None and real_only:
            usable = usable & tokens.keep.reshape(-1)
        return rows if bool(usable.all()) else rows[:, usable]

    def update_(self, token_sets: list[Tokens]) -> None:
        """One EMA k-means step from each real token's nearest centroid (`ema_step_`)."""
        ema_step_(self, token_sets, self.decay, self.eps)

    def cluster_sums(self, token_sets: list[Tokens], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(count (H, c), sum (H, c, D)) of the real, finite tokens assigned to each centroid (`cluster_sums`)."""
        return cluster_sums(self.centroids, token_sets, dtype)

    def commitment_loss(self, token_sets: list[Tokens]) -> Tensor:
        """commitment * mean over real tokens (and heads, dims) of (x_hat - stopgrad(mu_nearest))^2.

        Differentiable in x_hat, so it pulls the model's queries and keys towards their centroids.
        """
        H = self.heads
        total, count = None, 0
        for tokens in token_sets:
            x = tokens.x_hat
            B, _, L, _ = x.shape
            D = x.shape[-1]
            mu = self.centroids.to(x.dtype).view(-1, D).index_select(0, self.cells(tokens.nearest)).view(x.shape)
            diff = x - mu  # mu is a buffer: no gradient to it
            # the row-wise dot product as a batched matmul: several times faster on CPU than
            # square().mean(), which writes a (B, H, L, D) temporary
            squared = torch.einsum("bhld,bhld->bhl", diff, diff) / D
            if tokens.keep is not None:
                squared = squared * tokens.keep.view(B, 1, L)
                count += int(tokens.keep.sum()) * H
            else:
                count += B * H * L
            part = squared.sum()
            total = part if total is None else total + part
        return self.commitment * total / max(count, 1)
