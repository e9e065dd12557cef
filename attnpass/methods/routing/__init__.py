"""method="routing": Routing Transformer attention (Roy et al. 2021) on the grouped CPU kernel.

Per query head, online k-means (`kmeans.OnlineKMeans`) keeps c centroids in the layer-normed
space. Each cluster takes its ceil(Lq/c) most similar queries and, separately, its ceil(Lk/c)
most similar real keys (GQA: the keys of the kv head the query head reads); attention is dense
inside each cluster (causal by original position), computed by one `grouped_attention` call, and
a token's outputs are averaged over the clusters it landed in. Attention uses the raw q, k and the
site's scale; the normalised tokens only decide the routing.

Every query gets an output. A query no cluster took, or whose every cluster row is empty by
structure (no real key in the cluster, or all of them later than the query under causal), attends
instead to a local window of `local_window` real keys around its key-space position (causal: the
last ones at or before i + offset; otherwise centred on floor(i * Lk / Lq)). That fallback runs
only for those queries: a second `grouped_attention` call whose groups are the orphans of each
block of `local_window` positions, sharing the union of their windows as key slots, each query
held to its own window by the kernel's `key_range` (tiles instead of one query at a time).
Empty rows are found from the index structure (O(c * w)), not from output values, and are left
out of the average.

Two options depart from the paper for pretrained models, whose queries and keys are not shared:
`queries="nearest"` puts each query in its nearest centroid's cluster only (clusters of unequal
size, padded to the largest; a cluster of n queries takes ceil(n Lk / Lq) keys, so a large cluster
does not share the few keys of an average one), and `keys="members"` gives each cluster the keys its
member queries attend to most, from the exact scores of the `sampled_queries` of them (per Lq / c
members, with queries="nearest") estimated to attend most to far keys (`member_keys.py`; no key
that none of them may read, so a cluster whose members read only near keys gets none),
instead of the keys nearest its centroid; its centroids then cluster the queries alone. Centroids
fitted on other text can put most of a prompt's queries in a few clusters: `refit_steps=n` routes each
call by the centroids after n Lloyd steps on its own tokens (`OnlineKMeans.refit`; the state is unchanged,
and training's EMA still assigns by the state).

The first `local_heads` query heads do block-local attention instead (blocks of `local_window`
queries see their own and the previous key block, and the next one when not causal), as the
paper mixes routing heads with local heads.

Training: the centroids follow an EMA of the tokens assigned to them (train mode only), and each
training call leaves a commitment loss in `aux_loss()`, which the user adds to the task loss
(`attnpass.aux_loss(model)`). A general `mask` is read at the computed pairs; a row it empties
gets zeros and still counts in the average (emptiness by mask is not visible from the structure).
Nothing of size Lq x Lk is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnpass import cost_model
from attnpass.lowering.torch.grouped_attention import grouped_attention, scatter_slots
from attnpass.methods.anchor import ANCHOR_OPTIONS, Anchor, check_anchor_options, scatter_merge
from attnpass.methods.base import SiteAttention, SiteSpec, key_anchor, refuse_budget
from attnpass.methods.kmeans import OnlineKMeans, Tokens
from attnpass.methods.options import check_int, check_known, check_real
from attnpass.methods.pairs import group_pairs
from attnpass.methods.routing import member_keys
from attnpass.methods.symbolic import ceil_div, read_size, tracing, view_merged

_OPTIONS = ("clusters", "decay", "commitment", "local_heads", "local_window", "queries", "keys",
            "sampled_queries", "refit_steps") + ANCHOR_OPTIONS
# How a cluster takes its queries: its ceil(Lq / c) most similar ones (the paper's balanced routing: a
# query may land in several clusters or none), or the queries whose nearest centroid it is (each in one;
# keys then in proportion to them)
QUERY_ROUTING = ("balanced", "nearest")
# How a cluster chooses its keys (ceil(Lk / c), or in proportion to its queries with queries="nearest"): the
# most similar to its centroid (the paper), or the keys its member queries attend to most
# (`member_keys.py`: exact scores of a few sampled members)
KEY_ROUTING = ("centroids", "members")
DEFAULT_SAMPLED_QUERIES = 8
DEFAULT_LOCAL_WINDOW = 64
# What a fallback tile costs beyond its rows, in rows: it gathers its own key slots (`_orphan_tiles`)
_TILE_OVERHEAD_ROWS = 2


def _default_clusters(len_q: int, len_k: int, head_dim: int) -> int:
    """Cluster count when the user gave none: the cost model's minimiser (about sqrt(L))."""
    clusters = cost_model.default_clusters(len_q, len_k, head_dim)
    # a default must never trip the "more clusters than tokens" check
    return min(max(clusters, 1), max(min(len_q, len_k), 1))


# --------------------------------------------------------------------------------------------
# Layout: which pairs are computed
# --------------------------------------------------------------------------------------------


@dataclass
class RoutingLayout:
    """The pairs one call computes. Positions are original token positions, -1 = empty slot.

    Routing heads (the last Hr = Hq - local_heads query heads, numbered from 0 here):
        routed_q_index  (B, Hr, c, w_q)  each cluster's queries, sorted by position
        q_index         (B, Hr, c, w_q)  routed_q_index with slots whose row is empty set to -1
        k_index         (B, Hr, c, w_k)  each cluster's real keys, sorted, -1 slots last
        fallback_q_index (B, Hr, G, Wq)  queries with no non-empty cluster row, in tiles of Wq rows,
                                         each within one block of local_window positions (-1 = none)
        fallback_k_index (B, Hr, G, Wk)  the union of the group's windows (real keys, sorted)
        fallback_key_range (B, Hr, G, Wq, 2)  each query's window: the keys in [low, high]
    Local heads (the first local_heads query heads; the same blocks for every batch row and head):
        local_q_index   (G, W) / local_k_index (G, Wk), or None without local heads
    """

    routed_q_index: Tensor | None
    q_index: Tensor | None
    k_index: Tensor | None
    fallback_q_index: Tensor | None
    fallback_k_index: Tensor | None
    fallback_key_range: Tensor | None
    local_q_index: Tensor | None
    local_k_index: Tensor | None

    def __repr__(self) -> str:
        def shape(t):
            return "None" if t is None else "x".join(map(str, t.shape))

        routed = (f"clusters {shape(self.q_index)} queries / {shape(self.k_index)} keys, "
                  f"fallback {shape(self.fallback_k_index)}") if self.q_index is not None else "no routing heads"
        local = f"local blocks {shape(self.local_k_index)}" if self.local_k_index is not None else "no local heads"
        return f"RoutingLayout({routed}; {local})"


def _window_ranks(query_pos: Tensor, real_up_to: Tensor, num_real: Tensor, len_q: int, len_k: int,
                  window: int, causal: bool, offset: int) -> tuple[Tensor, Tensor]:
    """First and last RANK among the real keys of each query's window (last < first: empty).

    query_pos (B, H, ...) (-1 = none). The window counts real keys only, so padding never takes a
    slot: causal, the last `window` real keys at or before the anchor; otherwise `window` real keys
    centred on the anchor (shifted to stay inside the real keys, so a sequence with at least
    `window` real keys always fills it).
    """
    B = query_pos.shape[0]
    # not min(window, Lk): ranks and counts are at most Lk, so a longer window gives the same ranks, and
    # a traced length is not compared with the window (a guard that would fix which side the length is on)
    W = window
    anchor = key_anchor(query_pos.clamp(min=0), len_q, len_k, causal, offset)
    seen = real_up_to.gather(1, anchor.clamp(min=0).reshape(B, -1)).view(anchor.shape)
    seen = torch.where(anchor < 0, 0, seen)  # real keys at or before the anchor
    num_real = num_real.view((B,) + (1,) * (query_pos.dim() - 1))
    if causal:
        first, limit = seen - W, seen
    else:
        first = ((seen - 1).clamp(min=0) - W // 2).clamp(min=0)
        first, limit = torch.minimum(first, (num_real - W).clamp(min=0)), num_real
    last = torch.minimum(first + W, limit) - 1
    first = first.clamp(min=0)
    return first, torch.where(query_pos >= 0, last, first - 1)


def _orphan_tiles(orphan: Tensor) -> Tensor:
    """(B, H, G, T) positions of the orphan queries (-1 = none) in tiles of T rows, each tile within
    one block: a block's orphans in position order fill ceil(n / T) tiles, blocks without orphans none.

    orphan (B, H, blocks, P) bool. The kernel pads every (batch row, head) to the same G tiles of T
    rows; T is chosen per call among the fullest block's count, P/2 and P/4 to minimise the tiles'
    rows plus a per-tile cost (each tile gathers its own key slots), so one block whose queries all
    fall back (the first positions of a causal call) does not widen every block's tile to P rows.
    """
    B, H, blocks, P = orphan.shape
    dev = orphan.device
    counts = orphan.sum(dim=-1)                                          # (B, H, blocks)
    # one tile per block (as wide as the fullest block), or tiles of P/2 or P/4 rows, widest first
    widths = torch.stack([counts.max().clamp(min=1), torch.tensor(max(P // 2, 1), device=dev),
                          torch.tensor(max(P // 4, 1), device=dev)]).sort(descending=True).values
    # tiles each width needs (the fullest batch row and head); the first of the cheapest is taken
    needed = ceil_div(counts.unsqueeze(-1), widths).sum(dim=-2).flatten(0, 1).amax(dim=0).clamp(min=1)
    chosen = torch.argmin(needed * (widths + _TILE_OVERHEAD_ROWS), dim=0, keepdim=True)
    # read as sizes: kept symbolic when traced (a block's P orphans in tiles of one row at most)
    rows = read_size(widths.gather(0, chosen)[0], 1, P)
    G = read_size(needed.gather(0, chosen)[0], 1, blocks * P)
    per_block = ceil_div(counts, rows)                                   # tiles of each block
    ends = per_block.cumsum(dim=-1)                                      # (B, H, blocks)
    tile = torch.arange(G, device=dev).expand(B, H, G).contiguous()
    # each tile's block: the blocks ending at or before it (searchsorted(ends, tile, right=True), which
    # has no ONNX op), counted by a histogram of the ends; blocks: past the last tile
    ended = torch.zeros(B, H, G + 1, dtype=ends.dtype, device=dev).scatter_add_(
        -1, ends.clamp(max=G), torch.ones_like(ends))
    block = ended.cumsum(dim=-1)[..., :G]
    used = block < blocks
    block = block.clamp(max=blocks - 1)
    first_rank = (tile - (ends.gather(-1, block) - per_block.gather(-1, block))) * rows
    rank = first_rank.unsqueeze(-1) + torch.arange(rows, device=dev)    # (B, H, G, T) rank in the block
    real = used.unsqueeze(-1) & (rank < counts.gather(-1, block).unsqueeze(-1))
    # orphans first in each block (stable: by position)
    order = view_merged(torch.argsort((~orphan).to(torch.int8), dim=-1, stable=True), B, H, blocks * P)
    within = order.gather(-1, view_merged(block.unsqueeze(-1) * P + rank.clamp(max=P - 1), B, H, G * rows))
    within = within.view(B, H, G, rows)
    return torch.where(real, within + block.unsqueeze(-1) * P, -1)


def _block_local_layout(len_q: int, len_k: int, window: int, causal: bool, offset: int,
                        device: torch.device) -> tuple[Tensor, Tensor]:
    """Blocks of `window` queries and the keys they see: their own and the previous key block
    (causal), or the previous, own and next (not causal). Returns (G, window) and (G, Wk)."""
    blocks = ceil_div(len_q, window)
    q = torch.arange(blocks * window, device=device).view(blocks, window)
    q_index = torch.where(q < len_q, q, -1)
    first_query = torch.arange(blocks, device=device) * window
    last_query = (first_query + window - 1).clamp(max=len_q - 1)
    first = key_anchor(first_query, len_q, len_k, causal, offset)
    last = key_anchor(last_query, len_q, len_k, causal, offset)
    if causal:
        start, width = last - 2 * window + 1, 2 * window
    else:
        # the widest block's span of anchors: a full block's when queries are keys (the first block is one;
        # shorter than a block, the slots past the last key are empty: no guard comparing L with the window)
        span = window - 1 if statically_known_true(len_q == len_k) else \
            read_size((last - first).max(), 0, len_k - 1)
        start, width = first - window, span + 2 * window + 1
    k = start.unsqueeze(-1) + torch.arange(width, device=device)
    return q_index, torch.where((k >= 0) & (k < len_k), k, -1)


def _head_slice(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Heads [start, stop) of a tensor broadcastable to (B, H, Lq, Lk); a broadcast head dim stays."""
    if t is None or t.dim() < 3 or t.shape[-3] == 1:
        return t
    return t[..., start:stop, :, :]


# --------------------------------------------------------------------------------------------
# The site module
# --------------------------------------------------------------------------------------------


class RoutingAttention(SiteAttention):
    method_name = "routing"
    onnx_lowering = "attnpass.lowering.onnx.routing"
    cost_formulas = "attnpass.methods.routing.cost"
    has_learned_state = True
    state_sized_by = "routing sizes its centroids"
    options = _OPTIONS

    def __init__(self, spec: SiteSpec, **options):
        self.check_site(spec, **options)
        super().__init__(spec, Anchor.from_options(options))
        heads, head_dim = spec.heads_q, spec.head_dim
        group = heads // spec.heads_kv if spec.heads_kv else 1
        self.local_heads: int = int(options.get("local_heads", 0))
        if self.local_heads > heads or self.local_heads % group:
            raise ValueError(
                f"method 'routing', site {spec.name!r}: local_heads={self.local_heads} must be at most the "
                f"site's {heads} query heads and a multiple of its {group} query heads per kv head")
        window = options.get("local_window")
        self.local_window: int = DEFAULT_LOCAL_WINDOW if window is None else int(window)
        lengths = [n for n in (spec.example_len_q, spec.example_len_k) if n is not None]
        clusters = options.get("clusters")
        if clusters is None:
            len_q, len_k = spec.example_len_q or lengths[0], spec.example_len_k or lengths[0]
            clusters = _default_clusters(len_q, len_k, head_dim)
        elif lengths and clusters > min(lengths):
            raise ValueError(
                f"method 'routing', site {spec.name!r}: clusters={clusters} is more than the example call's "
                f"tokens (Lq={spec.example_len_q}, Lk={spec.example_len_k}); use clusters <= {min(lengths)}")
        self.clusters: int = int(clusters)
        self.queries: str = options.get("queries", "balanced")
        self.keys: str = options.get("keys", "centroids")
        sampled = options.get("sampled_queries")
        self.sampled_queries: int = DEFAULT_SAMPLED_QUERIES if sampled is None else int(sampled)
        self.refit_steps: int = int(options.get("refit_steps", 0))
        routing_heads = heads - self.local_heads
        self.kmeans = OnlineKMeans(
            routing_heads, self.clusters, head_dim, decay=float(options.get("decay", 0.999)),
            commitment=float(options.get("commitment", 1e-4)),
        ) if routing_heads else None
        self._last_aux_loss: Tensor | None = None

    @classmethod
    def validate_options(cls, **options) -> None:
        check_known("routing", options, _OPTIONS)
        for name in ("clusters", "local_window"):
            if options.get(name) is not None:
                check_int("routing", name, options[name], 1)
        for name in ("local_heads", "refit_steps"):
            if name in options:
                check_int("routing", name, options[name], 0)
        if "decay" in options:
            check_real("routing", "decay", options["decay"], 0.0, 1.0, low_open=True)
        if "commitment" in options:
            check_real("routing", "commitment", options["commitment"], 0.0, math.inf, low_open=False)
        if options.get("queries", "balanced") not in QUERY_ROUTING:
            raise ValueError(f"method 'routing': option queries={options['queries']!r} must be one of {list(QUERY_ROUTING)}")
        if options.get("keys", "centroids") not in KEY_ROUTING:
            raise ValueError(f"method 'routing': option keys={options['keys']!r} must be one of {list(KEY_ROUTING)}")
        if options.get("sampled_queries") is not None:
            check_int("routing", "sampled_queries", options["sampled_queries"], 1)
            if options.get("keys", "centroids") != "members":
                raise ValueError("method 'routing': option sampled_queries= is read only with keys='members'")
        check_anchor_options("routing", options)

    @classmethod
    def unsupported_reason(cls, spec: SiteSpec, **options) -> str | None:
        reason = super().unsupported_reason(spec, **options)
        if reason:
            return reason
        if options.get("clusters") is None and spec.example_len_q is None and spec.example_len_k is None:
            return "the example call's sequence lengths are unknown, so no default cluster count; pass clusters="
        return None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, clusters={self.clusters}, local_heads={self.local_heads}, "
                f"local_window={self.local_window}, queries={self.queries!r}, keys={self.keys!r}"
                + (f", sampled_queries={self.sampled_queries}" if self.keys == "members" else "")
                + (f", refit_steps={self.refit_steps}" if self.refit_steps else ""))

    def aux_loss(self) -> Tensor | None:
        """The commitment loss of the last training call (None before any)."""
        return self._last_aux_loss

    # ---------------------------------------------------------------------------------------

    def layout(self, q: Tensor, k: Tensor, key_keep: Tensor | None = None) -> RoutingLayout:
        """The pairs `forward(q, k, ..., key_keep=key_keep)` would compute now (initialises the
        centroids from this batch if no batch has been seen yet)."""
        self._check_shapes(q, k)
        with torch.no_grad():
            routed = self._route(*self._routing_heads(q, k), key_keep)[0] if self.kmeans is not None else None
            local = self._local_layout(q, k) if self.local_heads else (None, None)
        if routed is None:
            return RoutingLayout(None, None, None, None, None, None, *local)
        return RoutingLayout(*routed, *local)

    def needs_first_call(self) -> bool:
        return self.kmeans is not None and not bool(self.kmeans.initialized)  # None: every head is local

    def computed_pairs(self, q, k, key_keep=None):
        """The pairs of the layout; with keys='members', per query the scores that choose the keys
        (`_key_choice_scores`)."""
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        layout = self.layout(q, k, key_keep)
        parts = []
        if self.local_heads:
            local = group_pairs(layout.local_q_index, layout.local_k_index, Lq, Lk)
            parts.append(local.expand(B, self.local_heads, Lq, Lk))
        if layout.q_index is None:
            return torch.cat(parts, dim=1), None
        routed = group_pairs(layout.q_index, layout.k_index, Lq, Lk)
        if layout.fallback_q_index is not None:
            routed |= group_pairs(layout.fallback_q_index, layout.fallback_k_index, Lq, Lk, layout.fallback_key_range)
        pairs = torch.cat(parts + [routed], dim=1)
        if self.keys != "members":
            return pairs, None
        scored = self._key_choice_scores(q, k, layout.routed_q_index, key_keep)
        local_scored = scored.new_zeros(B, self.local_heads, Lq)
        return pairs, torch.cat([local_scored, scored], dim=1)

    def _key_choice_scores(self, q: Tensor, k: Tensor, routed_q: Tensor, key_keep: Tensor | None) -> Tensor:
        """(B, Hr, Lq) int64, keys='members': the scores each routing-head query computes to choose the
        clusters' keys, its Lk / member_keys.NEED_BLOCK pooled block scores and, for a sampled member, all Lk keys
        (once per cluster it is sampled for)."""
        Lk = k.shape[2]
        q, k = self._routing_heads(q, k)
        with torch.no_grad():
            rows, _ = self._sampled_members(q, k, routed_q, key_keep, self.spec.causal, self.layout_offset(q, k))
        B, H = rows.shape[:2]
        counts = torch.full((B, H, q.shape[2]), ceil_div(Lk, member_keys.NEED_BLOCK), dtype=torch.int64, device=q.device)
        return counts.scatter_add_(2, rows.clamp(min=0), torch.where(rows >= 0, Lk, 0))

    def layout_traces(self, q, k, v, bias, mask, dropout_p: float) -> bool:
        """The layout is tensor code of the lengths (the sizes the data decides, the fallback's tiles and
        spans, a nearest cluster's width, the member samples, are ints read back with bounds; the
        members' exact scores an op): a call traces in inference (training's EMA step is a state update
        in Python; so is the first call's initialisation of the centroids, `needs_first_call`, which the
        compile backend runs eagerly), where its queries are its keys; an anchor only where it runs on
        its flash op."""
        return (not self.training and statically_known_true(q.shape[2] == k.shape[2])
                and (not self.anchor or self.anchor.runs_on_flash(bias, mask, dropout_p, q, k, v)))

    def cost_options_at_any_length(self, head_dim: int) -> dict | None:
        return self.cost_options(0, 0, head_dim)  # they do not read the lengths

    def cost_options(self, len_q: int, len_k: int, head_dim: int) -> dict:
        return {"clusters": self.clusters, "local_window": self.local_window,
                "sampled_queries": self.sampled_queries if self.keys == "members" else 0,
                "refit_steps": self.refit_steps}

    def fitter(self, *, lr, gold, mass, density_weight, budget=None):
        """The centroids, by mini-batch k-means (`calibrate_fitters.RoutingFitter`); None when every
        head is local."""
        refuse_budget(self.method_name, budget)
        if self.kmeans is None:
            return None
        from attnpass.tools.calibrate_fitters import RoutingFitter

        return RoutingFitter(self)

    def sparse_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                       empty_rows: str = "zero"):  # queries with no key get zeros (SiteAttention.forward)
        return self._attend(q, k, v, bias, mask, key_keep, dropout_p, one_softmax=False)[0]

    def sparse_attention(self, q, k, v, bias, mask, key_keep, dropout_p: float):
        """As `sparse_forward`, except that a query in several clusters gets one softmax over all
        their pairs (a key two of them share counts twice) instead of the average of their outputs."""
        return self._attend(q, k, v, bias, mask, key_keep, dropout_p, one_softmax=True)

    def _attend(self, q, k, v, bias, mask, key_keep, dropout_p: float, one_softmax: bool):
        """(out, logsumexp per row, or None when averaging over clusters)."""
        self._check_shapes(q, k)
        B, Hq, Lq, _ = q.shape
        if Lq == 0 or k.shape[2] == 0:  # no key to see: zeros, as dense attention gives
            return q.new_zeros(B, Hq, Lq, v.shape[3]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
        p = dropout_p if self.training else 0.0
        n_local, n_kv_local = self.local_heads, self.local_heads // (Hq // k.shape[1])
        parts = []
        if n_local:
            parts.append(self._local_forward(
                q[:, :n_local], k[:, :n_kv_local], v[:, :n_kv_local], _head_slice(bias, 0, n_local),
                _head_slice(mask, 0, n_local), key_keep, p))
        if n_local < Hq:
            parts.append(self._routed_forward(
                q[:, n_local:], k[:, n_kv_local:], v[:, n_kv_local:], _head_slice(bias, n_local, Hq),
                _head_slice(mask, n_local, Hq), key_keep, p, one_softmax))
        if len(parts) == 1:
            return parts[0]
        stat = None if parts[1][1] is None else torch.cat([parts[0][1], parts[1][1]], dim=1)
        return torch.cat([parts[0][0], parts[1][0]], dim=1), stat

    # ---------------------------------------------------------------------------------------

    def _check_shapes(self, q: Tensor, k: Tensor) -> None:
        # the centroids are sized by the site's heads and head dim
        if q.shape[1] != self.spec.heads_q or q.shape[3] != self.spec.head_dim:
            raise ValueError(
                f"routing site {self.spec.name!r} was built for {self.spec.heads_q} query heads of dim "
                f"{self.spec.head_dim}, got q of shape {tuple(q.shape)}")
        if self.local_heads % (q.shape[1] // k.shape[1]):
            raise ValueError(
                f"routing site {self.spec.name!r}: local_heads={self.local_heads} must be a multiple of the "
                f"{q.shape[1] // k.shape[1]} query heads per kv head")

    def _routing_heads(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        n_kv_local = self.local_heads // (q.shape[1] // k.shape[1])
        return q[:, self.local_heads:], k[:, n_kv_local:]

    def _query_keep(self, key_keep: Tensor | None, len_q: int, len_k: int) -> Tensor | None:
        # In self-attention query i is key i, so key padding is query padding too.
        if key_keep is None or self.spec.cross or len_q != len_k:
            return None
        return key_keep

    def _route(self, q: Tensor, k: Tensor, key_keep: Tensor | None, keep_tokens: bool = False):
        """Routing-head layout, plus (with keep_tokens) the tokens the centroids cluster, with their
        nearest centroids, that the commitment loss and the EMA step need (`_token_sets`).

        Returns ((routed_q_index, q_index, k_index, fallback_q_index, fallback_k_index), token_sets).
        """
        Lq, Lk = q.shape[2], k.shape[2]
        causal, offset = self.spec.causal, self.layout_offset(q, k)
        q_hat, k_hat, query_keep = self._normalised(q, k, key_keep)
        with torch.no_grad():
            centroids = self.kmeans.refit(self._token_sets(q_hat, k_hat, None, None, query_keep, key_keep),
                                          self.refit_steps) if self.refit_steps else None
            sim_q, sim_k = self.kmeans.similarity(q_hat.detach(), k_hat.detach(), centroids)
            c = self.kmeans.clusters
            # Padded queries rank last but keep their slots: their outputs are defined, as in dense.
            if self.queries == "nearest":
                routed_q = OnlineKMeans.member_slots(OnlineKMeans.nearest(sim_q), c)
            else:
                routed_q = OnlineKMeans.top_slots(sim_q, ceil_div(Lq, c), query_keep, drop_unkept=False)
            key_scores = sim_k if self.keys == "centroids" else \
                member_keys.member_key_scores(q, k, routed_q, key_keep, **self._member_options(q, causal, offset))
            # keys in proportion to members with queries='nearest': the balanced case's Lk / c each
            widths = member_keys.in_proportion(routed_q, Lk, Lq) if self.queries == "nearest" else None
            if self.keys == "members":  # no key no sample may read (a cluster without a sample: none)
                readable = torch.isfinite(key_scores).sum(dim=-1)
                widths = readable.clamp(max=ceil_div(Lk, c)) if widths is None else torch.minimum(widths, readable)
            width = read_size(widths.max().clamp(min=1), 1, Lk) if widths is not None else ceil_div(Lk, c)
            k_index = OnlineKMeans.top_slots(key_scores, width, key_keep, widths=widths)
            # A row is empty when its cluster has no real key, or (causal) none at or before it;
            # keys are sorted, so the first slot decides.
            first_key = k_index[..., 0].unsqueeze(-1)  # not [..., :1]: a slot, whatever the traced width
            row_filled = (routed_q >= 0) & (first_key >= 0)
            if causal:
                row_filled &= first_key <= routed_q + offset
            q_index = torch.where(row_filled, routed_q, -1)
            fallback_q, fallback_k, fallback_range = self._fallback(q_index, key_keep, Lq, Lk, causal, offset)
        if keep_tokens and centroids is not None:  # the state learns from its own assignment, not the refit's
            with torch.no_grad():
                sim_q, sim_k = self.kmeans.similarity(q_hat.detach(), k_hat.detach())
        token_sets = self._token_sets(q_hat, k_hat, sim_q, sim_k, query_keep, key_keep) if keep_tokens else []
        return (routed_q, q_index, k_index, fallback_q, fallback_k, fallback_range), token_sets

    def _normalised(self, q: Tensor, k: Tensor, key_keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(q_hat, k_hat, query_keep): the routing heads' tokens in the centroids' space, differentiable
        (the commitment loss reaches q and k through them). Initialises the centroids from the tokens
        they cluster if no batch has been seen yet."""
        query_keep = self._query_keep(key_keep, q.shape[2], k.shape[2])
        q_hat, k_hat = OnlineKMeans.normalise(q), OnlineKMeans.normalise(k)
        if not tracing() and not bool(self.kmeans.initialized):  # traced: initialised before (needs_first_call)
            with torch.no_grad():
                self.kmeans.initialize_(self._token_sets(q_hat, k_hat, None, None, query_keep, key_keep))
        return q_hat, k_hat, query_keep

    def _token_sets(self, q_hat: Tensor, k_hat: Tensor, sim_q: Tensor | None, sim_k: Tensor | None,
                    query_keep: Tensor | None, key_keep: Tensor | None) -> list[Tokens]:
        """The tokens the centroids cluster, each with its nearest centroid (None: not yet known): the
        queries, and the keys unless keys='members' (whose keys are chosen by their members' scores,
        so the centroids stand for queries alone)."""
        nearest = (lambda sim: None if sim is None else OnlineKMeans.nearest(sim))
        token_sets = [Tokens(q_hat, query_keep, nearest(sim_q))]
        if self.keys == "centroids":  # GQA: query head h clusters the keys of kv head h // (H // Hkv)
            token_sets.append(Tokens(_per_query_head(k_hat, q_hat.shape[1]), key_keep, nearest(sim_k)))
        return token_sets

    def routing_tokens(self, q: Tensor, k: Tensor, key_keep: Tensor | None) -> list[Tokens]:
        """The routing heads' tokens the centroids cluster, with their nearest centroids (for
        calibration's k-means), without building the layout."""
        q, k = self._routing_heads(q, k)
        q_hat, k_hat, query_keep = self._normalised(q, k, key_keep)
        with torch.no_grad():
            sim_q, sim_k = self.kmeans.similarity(q_hat.detach(), k_hat.detach())
        return self._token_sets(q_hat, k_hat, sim_q, sim_k, query_keep, key_keep)

    def _sampled_members(self, q: Tensor, k: Tensor, members: Tensor, key_keep: Tensor | None, causal: bool,
                         offset: int) -> tuple[Tensor, Tensor]:
        """`member_keys.sampled_members` with this site's options."""
        return member_keys.sampled_members(q, k, members, key_keep, **self._member_options(q, causal, offset))

    def _member_options(self, q: Tensor, causal: bool, offset) -> dict:
        return {"causal": causal, "offset": offset, "scale": self.scale(q), "local": self.anchor_local(),
                "sampled_queries": self.sampled_queries, "nearest": self.queries == "nearest"}

    def _fallback(self, q_index: Tensor, key_keep: Tensor | None, len_q: int, len_k: int,
                  causal: bool, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries with no filled cluster row and their local windows of real keys, packed by position.

        Orphan queries of each block of `local_window` positions form one or more groups of a few
        rows (`_orphan_tiles`; the kernel runs tiles, not one query at a time); a group's key slots
        are the union of its queries' windows, and each query's own window is enforced by the
        kernel's key_range. Returns fallback_q (B, H, G, Wq), fallback_k (B, H, G, Wk) and key
        ranges (B, H, G, Wq, 2).
        """
        B, H = q_index.shape[:2]
        dev = q_index.device
        valid = q_index >= 0
        filled = torch.zeros(B, H, len_q, dtype=torch.int64, device=dev).scatter_add_(
            2, view_merged(q_index.clamp(min=0), B, H, -1), view_merged(valid.to(torch.int64), B, H, -1))
        P = self.local_window
        blocks = ceil_div(len_q, P)
        orphan = torch.nn.functional.pad(filled == 0, (0, blocks * P - len_q)).view(B, H, blocks, P)
        fallback_q = _orphan_tiles(orphan)

        keep = key_keep if key_keep is not None else torch.ones(B, len_k, dtype=torch.bool, device=dev)
        real_in_order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # real positions first
        first, last = _window_ranks(fallback_q, keep.cumsum(dim=-1), keep.sum(dim=-1), len_q, len_k, P,
                                    causal, offset)
        # the group's keys: every real key ranked between its queries' first and last window ranks
        has_window = last >= first
        group_first = torch.where(has_window, first, len_k).amin(dim=-1)
        group_last = torch.where(has_window, last, -1).amax(dim=-1)
        span = read_size((group_last - group_first + 1).max().clamp(min=1), 1, len_k)
        rank = group_first.unsqueeze(-1) + torch.arange(span, device=dev)
        fallback_k = real_in_order.gather(1, rank.clamp(0, len_k - 1).view(B, -1)).view(rank.shape)
        fallback_k = torch.where(rank <= group_last.unsqueeze(-1), fallback_k, -1)
        # a window of consecutive real keys is the real keys between its first and last positions
        low = real_in_order.gather(1, first.clamp(0, len_k - 1).view(B, -1)).view(first.shape)
        high = real_in_order.gather(1, last.clamp(0, len_k - 1).view(B, -1)).view(last.shape)
        key_range = torch.stack([torch.where(has_window, low, 0), torch.where(has_window, high, -1)], dim=-1)
        return fallback_q, fallback_k, key_range

    def _routed_forward(self, q, k, v, bias, mask, key_keep, p, one_softmax: bool):
        Lq = q.shape[2]
        (_, q_index, k_index, fallback_q, fallback_k, fallback_range), token_sets = self._route(
            q, k, key_keep, self.training)
        causal, offset, scale = self.spec.causal, self.layout_offset(q, k), self.scale(q)
        seed = self.dropout_seed(p)
        # No key_padding_mask: padding keys never get a slot (routing and windows pick real keys).
        common = {"scale": scale, "causal": causal, "causal_offset": offset, "window": self.layout_window(),
                  "bias": bias, "pair_mask": mask,
                  "dropout_p": p, "dropout_seed": seed}
        gather = (lambda slots, index: scatter_merge(*slots, index, Lq)) if one_softmax \
            else (lambda slots, index: (scatter_slots(slots[0], index, Lq)[0], None))
        out, stat = gather(grouped_attention(q, k, v, q_index, k_index, **common), q_index)
        if tracing() or bool((fallback_q >= 0).any()):  # traced: a call with no orphan runs empty tiles
            # fallback queries are exactly the ones with no routed output, so adding is a merge
            fallback_out, fallback_stat = gather(
                grouped_attention(q, k, v, fallback_q, fallback_k, key_range=fallback_range, **common), fallback_q)
            out = out + fallback_out
            stat = None if stat is None else stat + fallback_stat
        if self.training:
            self._last_aux_loss = self.kmeans.commitment_loss(token_sets)
            self.kmeans.update_(token_sets)
        return out, stat

    def _local_layout(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return _block_local_layout(q.shape[2], k.shape[2], self.local_window, self.spec.causal,
                                   self.layout_offset(q, k), q.device)

    def _local_forward(self, q, k, v, bias, mask, key_keep, p):
        B, H, Lq, _ = q.shape
        q_index, k_index = self._local_layout(q, k)
        out_slots, stat = grouped_attention(
            q, k, v, q_index.expand(B, H, -1, -1), k_index.expand(B, H, -1, -1), scale=self.scale(q),
            causal=self.spec.causal, causal_offset=self.layout_offset(q, k), window=self.layout_window(),
            key_padding_mask=key_keep, bias=bias, pair_mask=mask, dropout_p=p, dropout_seed=self.dropout_seed(p),
        )
        # every query sits in exactly one slot, in order: read back by (block, rank), not scattered (nor
        # by a reshape and a slice to Lq, guards a symbolic length cannot discharge)
        i = torch.arange(Lq, device=q.device)
        block, rank = i // self.local_window, i % self.local_window
        return out_slots[:, :, block, rank], stat[:, :, block, rank]


def _per_query_head(k: Tensor, heads: int) -> Tensor:
    """(B, Hkv, L, D) -> (B, heads, L, D): kv head h // (heads // Hkv) for query head h (a view if no GQA)."""
    B, Hkv, L, D = k.shape
    if Hkv == heads:
        return k
    return k.unsqueeze(2).expand(B, Hkv, heads // Hkv, L, D).reshape(B, heads, L, D)
