"""What every method's per-site module shares: the site's static facts and the call signature.

The rewritten graph calls one `SiteAttention` module per site with canonical tensors:
q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), plus what is left of the site's
masking after mask analysis: `bias` (additive, broadcastable to (B, Hq, Lq, Lk)), `mask`
(bool, True = allowed, same broadcast), `key_keep` (bool (B, Lk)). The causal rule and the
scale are static facts of the site, held by the module. A method subclasses this and decides
which pairs are computed; its learnable state are its parameters and buffers, so they show in
the sparse model's `state_dict()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnpass.methods.anchor import Anchor, anchor_reason, merge_parts, with_mass


def key_anchor(query_pos: torch.Tensor, len_q: int, len_k: int, causal: bool, offset: int) -> torch.Tensor:
    """A query's position in key space, which methods use for windows and fallbacks: its last
    visible key when causal (i + offset, at most Lk - 1), else floor(i * Lk / Lq)."""
    if causal:
        return (query_pos + offset).clamp(max=len_k - 1)
    return query_pos * len_k // max(len_q, 1)


def refuse_budget(method_name: str, budget: float | None) -> None:
    """calibrate's error for a pair budget given to a method that takes none (`SiteAttention.fitter`)."""
    if budget is not None:
        raise ValueError(f"calibrate: budget= applies to method 'sparsefinder' (distance predictor), "
                         f"not {method_name!r}")


@dataclass(frozen=True)
class SiteSpec:
    """The facts of a site a method needs at run time."""

    name: str
    scale: float | None          # None: 1/sqrt(head dim) at run time (SDPA's default)
    causal: bool = False
    causal_bottom_right: bool = False
    # A band (a sliding window): query i sees only keys at distance < window from i + offset; at a
    # causal site the `window` keys ending at its own, j > i + offset - window. 0: none.
    window: int = 0
    heads_q: int | None = None
    heads_kv: int | None = None
    head_dim: int | None = None
    # The example call's lengths: methods with state sized by L (routing's clusters) choose
    # their defaults from them. Run-time lengths may differ.
    example_len_q: int | None = None
    example_len_k: int | None = None
    cross: bool = False
    # Masking the site keeps as tensors (after mask analysis): an additive bias, a bool mask.
    has_bias: bool = False
    has_mask: bool = False
    # True where the model called SDPA itself (SDPA in the input dtype is its semantics); False for
    # eager code, which takes its softmax in fp32 whatever the input dtype.
    sdpa_semantics: bool = True


class SiteAttention(nn.Module):
    method_name = "base"
    options: tuple[str, ...] = ()  # the option names the method takes (validate_options checks them)
    # The module of attnpass.lowering.onnx that lowers this method (its `bind(site_module)`, and its
    # `check_options(options)` where some options cannot be exported); None: no ONNX lowering
    onnx_lowering: str | None = None
    # The module of the method's FLOPs / bytes formulas, its part of attnpass.cost_model (which says
    # what such a module defines); None: no cost model
    cost_formulas: str | None = None
    # Whether the share of pairs the method computes is learned (SBM's graph, Sparsefinder's
    # predicted pairs): its cost is then in the density rho, which reports ask the user for
    learns_density: bool = False
    # Whether the method keeps learned state (centroids, projections, clusters) that must live in the
    # model: a compile backend bound to no model cannot keep it (attnpass.backends.compile)
    has_learned_state: bool = False
    # What of the method's state the site's query heads and head dim size (e.g. "routing sizes its
    # centroids"); None: nothing, so a site whose heads are unknown can still be served
    state_sized_by: str | None = None

    def __init__(self, spec: SiteSpec, anchor: Anchor | None = None):
        super().__init__()
        self.spec = spec
        # Attention sinks and a local window added to the method's pairs (attnpass.methods.anchor).
        self.anchor = anchor if anchor is not None else Anchor()

    def scale(self, q: torch.Tensor) -> float:
        return self.spec.scale if self.spec.scale is not None else q.shape[-1] ** -0.5

    def causal_offset(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """The site's causal rule: query i may see key j <= i + offset."""
        return k.shape[-2] - q.shape[-2] if self.spec.causal_bottom_right else 0

    def band_mask(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The site's band as a (Lq, Lk) bool mask (True = allowed), for the dense path only."""
        offset, len_q, len_k, window = self.causal_offset(q, k), q.shape[-2], k.shape[-2], self.spec.window
        keys = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
        near = ~keys.tril(offset - window)  # j > i + offset - window
        return near & (keys.tril(offset) if self.spec.causal else keys.tril(offset + window - 1))

    def anchor_local(self) -> int:
        """The anchor's local window at this site: within the site's band, if it has one."""
        if not self.spec.causal:
            return 0
        return min(self.anchor.local, self.spec.window) if self.spec.window else self.anchor.local

    def layout_offset(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """The causal offset the method's own layout uses: the site's, less the local window the
        anchor computes (keys j <= i + offset - local are the method's)."""
        return self.causal_offset(q, k) - self.anchor_local()

    def layout_window(self) -> int:
        """The band the method's pairs are held to, counted back from `layout_offset` (the kernels'
        `window`): keys j > i + layout_offset - layout_window. 0: the site has no band. At a band site
        whose whole band the anchor's window covers the method has no pairs (`method_has_pairs`)."""
        return self.spec.window - self.anchor_local() if self.spec.window else 0

    def method_has_pairs(self) -> bool:
        return not (self.spec.window and self.spec.causal and self.anchor_local() >= self.spec.window)

    def dropout_seed(self, dropout_p: float) -> int:
        # Drawn from torch's global RNG so torch.manual_seed makes training runs reproducible.
        if dropout_p > 0.0 and self.training:
            return int(torch.randint(0, 2**62, (), device="cpu"))
        return 0

    @classmethod
    def validate_options(cls, **options) -> None:
        """Raise a clear error for a bad option before anything is captured (site-independent checks)."""
        if options:
            raise ValueError(f"method {cls.method_name!r} takes no options, got {sorted(options)}")

    @classmethod
    def unsupported_reason(cls, spec: SiteSpec, **options) -> str | None:
        """Why this method cannot serve the site (it is then left unchanged and reported), or None:
        here, what every method shares (the anchor's options; state sized by the site's heads)."""
        reason = anchor_reason(spec, options)
        if reason:
            return reason
        if cls.state_sized_by and (spec.heads_q is None or spec.head_dim is None):
            return f"the site's query head count and head dim are unknown; {cls.state_sized_by} by them"
        return None

    @classmethod
    def check_site(cls, spec: SiteSpec, **options) -> None:
        """Both checks as one error, for a module constructed directly (sparsify asks them separately)."""
        cls.validate_options(**options)
        reason = cls.unsupported_reason(spec, **options)
        if reason:
            raise ValueError(f"method {cls.method_name!r} cannot serve site {spec.name!r}: {reason}")

    def needs_first_call(self) -> bool:
        """Whether the method's state is still to be initialised by its first call (routing's and
        Sparsefinder's centroids come from the first call's tokens)."""
        return False

    def fitter(self, *, lr: float, gold: str | None, mass: float | None, density_weight: float,
               budget: float | None = None):
        """What `attnpass.calibrate` fits at this site: an `attnpass.tools.calibrate_fitters.Fitter` on the
        module's own sparsity state, or None when the method has nothing to fit. `lr`: Adam's learning
        rate; `gold` / `mass`: Sparsefinder's gold graph; `density_weight`: SBM's price of density;
        `budget`: the share of pairs Sparsefinder's distance predictor keeps (no other method takes one)."""
        refuse_budget(self.method_name, budget)
        return None

    def aux_loss(self) -> torch.Tensor | None:
        """The method's training loss term from the last forward call (e.g. routing's commitment loss)."""
        return None

    # Results of the last call, not state: the aux loss holds its autograd graph, which neither
    # deepcopy nor pickle can take, and a copy of a trained model should not inherit either.
    _PER_CALL = ("_last_aux_loss", "last_graph", "last_metrics")

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._PER_CALL:
            if name in state:
                state[name] = None
        return state

    def extra_repr(self) -> str:
        causal = ("causal (bottom-right)" if self.spec.causal_bottom_right else "causal") if self.spec.causal else "non-causal"
        scale = "1/sqrt(d)" if self.spec.scale is None else f"{self.spec.scale:.4g}"
        anchor = f", {self.anchor}" if self.anchor else ""
        return f"site={self.spec.name!r}, scale={scale}, {causal}{anchor}"

    # Calls over cached keys with fewer queries than this run exact dense attention (decode steps);
    # None: the cost model decides per call (attnpass.prefill). Set by sparsify's `prefill_queries`.
    prefill_queries: int | None = None

    def forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                empty_rows: str = "zero"):
        """`empty_rows`: what the original computes at a query with no allowed key, a fact of the
        captured graph's masking (attnpass.frontend.site.MaskInfo): "zero", or "mean" (of V over all keys).
        The dense method reproduces it; the sparse methods give zeros there.

        A decode step (`is_decode_step`) runs exact dense attention over the cached keys; every
        other call runs the method (`sparse_forward`)."""
        if self.is_decode_step(q, k) or self.general_call_at_band_site(mask):
            return self.dense_forward(q, k, v, bias, mask, key_keep, dropout_p, empty_rows)
        if self.anchor:
            return self.anchored_forward(q, k, v, bias, mask, key_keep, dropout_p)
        return self.sparse_forward(q, k, v, bias, mask, key_keep, dropout_p, empty_rows)

    def sparse_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                       empty_rows: str = "zero"):
        raise NotImplementedError

    def traces_symbolically(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                            empty_rows: str = "zero") -> bool:
        """Whether a call on these inputs (fake tensors with symbolic lengths, as a compiled graph
        holds them) traces into the graph with no guard on its lengths: its layout and kernels are ops
        with fake kernels, and no Python decision reads a length. The compile backend then keeps the
        site in the graph it compiles instead of cutting the graph there and running the site eagerly
        (attnpass.backends.compile). A decode step known as one without its key length runs the dense
        op, so it traces; any other call traces where the method's own path does (`layout_traces`)."""
        p = dropout_p if self.training else 0.0
        return self.decode_step_without_lengths(q, k) or self.layout_traces(q, k, v, bias, mask, p)

    def layout_traces(self, q, k, v, bias, mask, dropout_p: float) -> bool:
        """Whether the method's path for this (non-decode) call traces with symbolic lengths;
        `dropout_p` is the call's effective one. Default: no (a layout built from the lengths as
        Python ints)."""
        return False

    def sparse_attention(self, q, k, v, bias, mask, key_keep, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, logsumexp per row) of ONE softmax over the method's pairs (anchor.merge_parts's
        contract: empty rows give 0 and 0); the method's layout uses `layout_offset`."""
        raise NotImplementedError(f"method {self.method_name!r} does not run with sinks= / local=")

    def computed_pairs(self, q: torch.Tensor, k: torch.Tensor, key_keep=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For measurement (attnpass.tools.site_probe), from the method's own layout, the anchor aside:
        (B, Hq, Lq, Lk) bool, the (query, key) pairs whose scores a call on (q, k) computes directly
        (an L x L tensor on purpose), and (B, Hq, Lq) counts of the other scores it computes per
        query (Combiner's region summaries, routing's key-choice scores) or None. Stateful methods answer
        for their current state."""
        raise NotImplementedError(f"no pair layout is known for method {self.method_name!r}")

    def method_key_keep(self, key_keep, k: torch.Tensor):
        """The key_keep the method's own layout runs with: the site's without the anchor's sinks."""
        return self.anchor.method_key_keep(key_keep, k.shape[0], k.shape[2], k.device)

    def anchored_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0):
        """The method's pairs, the sinks and the local window under one softmax (attnpass.methods.anchor)."""
        B, Hq, Lq, _ = q.shape
        if Lq == 0 or k.shape[2] == 0:
            return q.new_zeros(B, Hq, Lq, v.shape[3])
        p = dropout_p if self.training else 0.0
        v_mass = with_mass(v)
        parts = [self.sparse_attention(q, k, v_mass, bias, mask, self.method_key_keep(key_keep, k), p)] \
            if self.method_has_pairs() else []
        parts += self.anchor.parts(
            q, k, v_mass, key_keep=key_keep, bias=bias, mask=mask, scale=self.scale(q), causal=self.spec.causal,
            offset=self.causal_offset(q, k), dropout_p=p, dropout_seed=self.dropout_seed(p),
            band=self.spec.window)
        return merge_parts(parts)

    def general_call_at_band_site(self, mask) -> bool:
        """A call of another graph (e.g. a decode step over a sliding-window cache, whose keys no
        padding input lines up with) where this band site's masking stayed a general mask: that mask
        is the call's whole masking (a band is found only where no bool mask is left), so the call
        runs exact dense attention with it and the band is not applied again."""
        return bool(self.spec.window) and mask is not None

    def is_decode_step(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """A causal self-attention call continuing over cached keys (Lq < Lk) whose few queries gain
        nothing from the method's layout (see attnpass.prefill)."""
        len_q, len_k = q.shape[-2], k.shape[-2]
        if self.spec.cross or not self.spec.causal or len_q >= len_k:
            return False
        if self.prefill_queries is not None:
            return len_q < self.prefill_queries
        if type(len_k) is not int and type(len_q) is int and self._dearer_at_every_key_length(len_q, q.shape[-1]):
            return True  # traced: decided without reading the symbolic key length
        from attnpass.prefill import sparse_pays  # the cost model imports the methods' defaults

        return not sparse_pays(self.method_name, len_q, len_k, q.shape[-1], self.cost_options(len_q, len_k, q.shape[-1]),
                               anchor_keys=self.anchor.sinks + self.anchor.local)

    def decode_step_without_lengths(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether a call is a decode step (`is_decode_step`) whatever its key length: its query count a
        known int (a decode graph's one query), known to be below the key length (a call over cached
        keys: a prompt, whose queries are its keys, is none), and below `prefill_queries` when that is
        set, else the cost model proves the method dearer than dense attention at every key length
        past the queries (`prefill.sparse_never_pays`). The call then runs the dense op, which traces
        with a symbolic key length."""
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        len_q = q.shape[-2]
        if not (self.spec.causal and not self.spec.cross and not self.spec.window and type(len_q) is int
                and statically_known_true(len_q < k.shape[-2])):
            return False
        if self.prefill_queries is not None:
            return len_q < self.prefill_queries
        return self._dearer_at_every_key_length(len_q, q.shape[-1])

    def _dearer_at_every_key_length(self, len_q: int, head_dim: int) -> bool:
        """The cost model proves `len_q` queries dearer than dense attention at every key length past
        them (`prefill.sparse_never_pays`, with `cost_options_at_any_length`)."""
        options = self.cost_options_at_any_length(head_dim)
        if options is None:
            return False
        from attnpass.prefill import sparse_never_pays  # the cost model imports the methods' defaults

        return sparse_never_pays(self.method_name, len_q, head_dim, options)

    def cost_options_at_any_length(self, head_dim: int) -> dict | None:
        """`cost_options` valid at every length: those set from the lengths left out (the cost model
        then keeps their symbol, read as any positive value), or None (the default: no answer)."""
        return None

    def cost_options(self, len_q: int, len_k: int, head_dim: int) -> dict:
        """This module's parameters as `attnpass.cost_model.cost_expr` options, at these lengths."""
        return {}

    def dense_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                      empty_rows: str = "zero"):
        """The site's exact attention on the dense op (SDPA's fused kernel where it applies)."""
        import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention

        p = dropout_p if self.training else 0.0
        if self.spec.window and mask is None:  # the band as the (Lq, Lk) bool mask the original builds too
            mask = self.band_mask(q, k)
        # Training draws SDPA's own dropout (seed -1), equal in distribution to the original's.
        return torch.ops.attnpass.attention(
            q, k, v, bias, mask, key_keep, self.scale(q), self.spec.causal,
            self.causal_offset(q, k), p, -1 if p > 0.0 else 0,
            empty_rows, self.spec.sdpa_semantics,
        )
