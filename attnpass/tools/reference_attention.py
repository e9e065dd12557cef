"""Reference attention for measuring sparse methods: the oracle and attention sinks + a local window.

Two site modules that keep a share of each query row's *allowed* keys (allowed by the causal rule
and key padding) and renormalise the softmax over the kept keys:

- `OracleAttention` ("oracle"): a row with n allowed keys keeps its ceil(share * n) best (at least
  one), ranked by the true scores (the order of the true attention probabilities). It shows how
  close a content-aware method can get at a given per-row budget.
- `SinksLocalAttention` ("sinks_local"): a row keeps its first `sinks` allowed keys (attention
  sinks) and its `window` nearest allowed keys (causal: the last `window` up to the query; otherwise
  centred on the query's key-space position). Unless `window` is given, each call chooses it so
  that the pairs kept over the pairs allowed come closest to `share`: the simple structural
  baseline at the same budget.

These are measurement references, not faster attention: the oracle computes every allowed score
(it must, to rank them), and sinks_local, which scores only the keys of its pattern, is written for
clarity, not speed. Neither is in `attnpass.METHODS`; use them through `sparsify_reference`. Each
call records `last_pairs` (the (query head, query, key) pairs kept) and `last_allowed_pairs` (those
allowed), so a share is measured, not assumed; `measured_share` pools them over a model's sites.
Both override `forward` itself, so every call, a decode step over a cache included, runs the reference.

Memory stays bounded: query rows are processed in chunks of `chunk` rows, so the largest tensor is
one chunk's scores (B, Hq, chunk, Lk), never (B, H, Lq, Lk); under the causal rule a chunk skips
the keys after its last row's. Meant for evaluation under no_grad (with autograd on, every chunk's
probabilities are kept for backward).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from attnpass import api
from attnpass.methods.base import SiteAttention, SiteSpec, key_anchor
from attnpass.methods.options import check_int, check_known, check_real
from attnpass.sparse_module import SparseModel

DEFAULT_CHUNK = 256
# ceil(share * n) with a float share: 0.35 * 20 is 7.000000000000001 in binary, which must round to 7.
_CEIL_SLACK = 1e-9


class ReferenceAttention(SiteAttention):
    """What both references share: argument checks, the row-chunk loop, the pair counters."""

    method_name = "reference"
    options = ("share", "chunk")

    def __init__(self, spec: SiteSpec, **options):
        self.validate_options(**options)
        super().__init__(spec)
        self.share = float(options.get("share", 0.25))
        self.chunk = int(options.get("chunk", DEFAULT_CHUNK))
        self.last_pairs = 0
        self.last_allowed_pairs = 0

    @classmethod
    def validate_options(cls, **options) -> None:
        check_known(cls.method_name, options, cls.options)
        if "share" in options:
            check_real(cls.method_name, "share", options["share"], 0.0, 1.0, low_open=True, high_open=False)
        if "chunk" in options:
            check_int(cls.method_name, "chunk", options["chunk"], 1)

    @classmethod
    def unsupported_reason(cls, spec: SiteSpec, **options) -> str | None:
        if spec.has_bias or spec.has_mask:
            return "the references take causal masking and key padding only, not an additive bias or a general mask"
        if spec.window:
            return f"the references take causal masking and key padding, not a band (sliding window of {spec.window})"
        return None

    @property
    def last_share(self) -> float:
        return self.last_pairs / max(self.last_allowed_pairs, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, share={self.share:g}, chunk={self.chunk}"

    # -- what a subclass decides ------------------------------------------------------------------

    def plan(self, counts: Tensor, anchors: Tensor, len_k: int) -> None:
        """Per-call preparation from the rows' allowed-key counts (B, Lq) and anchors (B, Lq)."""

    def columns(self, allowed: Tensor, rows: slice) -> Tensor | None:
        """The key positions whose scores a chunk needs (LongTensor), or None for all of `allowed`'s
        columns. `allowed` is (B, c, n): the chunk's rows over the keys up to the last one any of
        them may see."""
        return None

    def keep(self, scores: Tensor, allowed: Tensor, rows: slice) -> Tensor:
        """The kept pairs of one chunk, a subset of `allowed`: bool, broadcastable to scores
        (B, Hkv, G, c, n), in which pairs not allowed are already -inf. `allowed` is (B, 1, 1, c, n)."""
        raise NotImplementedError

    # -- the shared computation -------------------------------------------------------------------

    def forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                empty_rows: str = "zero"):
        if bias is not None or mask is not None:
            raise ValueError(
                f"{type(self).__name__} ({self.method_name!r}) takes causal masking and key padding only; "
                f"site {self.spec.name!r} passed {'an additive bias' if bias is not None else 'a general mask'}")
        if dropout_p > 0.0 and self.training:
            raise ValueError(f"{type(self).__name__} is a measurement reference: run it in eval mode (no dropout)")
        if empty_rows not in ("zero", "mean"):
            raise ValueError(f"empty_rows must be 'zero' or 'mean', got {empty_rows!r}")
        B, Hq, Lq, D = q.shape
        Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        if Hq % Hkv:
            raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
        G = Hq // Hkv
        causal, offset = self.spec.causal, self.causal_offset(q, k)
        keys = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if key_keep is None else key_keep.to(torch.bool)
        key_pos = torch.arange(Lk, device=q.device)

        counts, anchors = _row_counts(keys, Lq, causal, offset)
        self.plan(counts, anchors, Lk)
        # q head h reads kv head h // G: a chunk's G heads and c rows are one (G * c, D) matrix per kv head
        qg = (q * self.scale(q)).reshape(B, Hkv, G, Lq, D)
        score_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32, as models do
        v_mean = v.mean(dim=-2, keepdim=True)[:, :, None] if empty_rows == "mean" else None
        outs, kept = [], 0
        for start in range(0, Lq, self.chunk):
            rows = slice(start, min(start + self.chunk, Lq))
            c = rows.stop - rows.start
            # causal: no row of the chunk sees past its last row's last key, so those scores are skipped
            n = min(max(rows.stop + offset, 0), Lk) if causal else Lk
            query_pos = torch.arange(rows.start, rows.stop, device=q.device)
            allowed = keys[:, None, :n].expand(B, c, n)
            if causal:
                allowed = allowed & (key_pos[:n] <= (query_pos + offset)[:, None])
            cols = self.columns(allowed, rows)
            if cols is None:
                k_c, v_c = k[:, :, :n], v[:, :, :n]
            else:
                allowed, k_c, v_c = allowed[..., cols], k[:, :, cols], v[:, :, cols]
                n = len(cols)
            allowed = allowed[:, None, None]  # (B, 1, 1, c, n): the same for every head
            q_c = qg[:, :, :, rows].reshape(B, Hkv, G * c, D)
            scores = torch.matmul(q_c, k_c.transpose(-1, -2)).view(B, Hkv, G, c, n).to(score_dtype)
            scores.masked_fill_(~allowed, float("-inf"))
            keep = self.keep(scores, allowed, rows)
            kept_per_row = keep.sum(dim=-1, keepdim=True)
            kept += int(kept_per_row.sum()) * (Hq // (keep.shape[1] * keep.shape[2]))
            probs = torch.softmax(scores.masked_fill_(~keep, float("-inf")), dim=-1)
            nothing = kept_per_row == 0
            if bool(nothing.any()):  # a row keeping nothing: zeros, not NaN
                probs.masked_fill_(nothing, 0.0)
            out = torch.matmul(probs.to(v.dtype).view(B, Hkv, G * c, n), v_c).view(B, Hkv, G, c, Dv)
            if v_mean is not None:  # a row with no allowed key outputs what the original's masking gives
                out = torch.where(counts[:, None, None, rows, None] == 0, v_mean, out)
            outs.append(out)
        self.last_pairs = kept
        self.last_allowed_pairs = int(counts.sum()) * Hq
        return torch.cat(outs, dim=-2).reshape(B, Hq, Lq, Dv)


def _row_counts(keys: Tensor, len_q: int, causal: bool, offset: int) -> tuple[Tensor, Tensor]:
    """Each row's number of allowed keys n (B, Lq), and its anchor's rank among them (B, Lq): the
    index, counted in allowed keys, of the last allowed key at or before the query's key-space
    position (-1 if none). O(B * (Lq + Lk)): no Lq x Lk tensor."""
    B, Lk = keys.shape
    seen = keys.long().cumsum(-1)  # allowed keys at positions <= j
    query_pos = torch.arange(len_q, device=keys.device)
    anchor = key_anchor(query_pos, len_q, Lk, causal, offset)
    at_anchor = torch.where(anchor >= 0, seen[:, anchor.clamp(min=0)], torch.zeros_like(seen[:, :1]))
    counts = at_anchor if causal else seen[:, -1:].expand(B, len_q)
    return counts, at_anchor - 1


class OracleAttention(ReferenceAttention):
    """Each row keeps its ceil(share * n) highest-scoring allowed keys (at least one)."""

    method_name = "oracle"

    def plan(self, counts: Tensor, anchors: Tensor, len_k: int) -> None:
        budget = torch.ceil(counts.double() * self.share - _CEIL_SLACK).long().clamp(min=1)
        self._budget = torch.where(counts > 0, budget, 0)  # (B, Lq)

    def keep(self, scores: Tensor, allowed: Tensor, rows: slice) -> Tensor:
        if self.share >= 1.0:
            return allowed
        budget = self._budget[:, None, None, rows, None]  # (B, 1, 1, c, 1)
        most = int(budget.max())
        if most == 0:
            return torch.zeros_like(allowed)
        # the `most` best allowed keys of each row in order; a row keeps the first `budget` of them
        best = scores.topk(most, dim=-1).indices
        in_budget = torch.arange(most, device=scores.device) < budget
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, best, in_budget.expand_as(best))


class SinksLocalAttention(ReferenceAttention):
    """Each row keeps its first `sinks` allowed keys and its `window` nearest allowed keys."""

    method_name = "sinks_local"
    options = ("share", "chunk", "sinks", "window")

    def __init__(self, spec: SiteSpec, **options):
        super().__init__(spec, **options)
        self.sinks = int(options.get("sinks", 4))
        self.fixed_window = options.get("window")
        self.last_window = None

    @classmethod
    def validate_options(cls, **options) -> None:
        super().validate_options(**options)
        if "sinks" in options:
            check_int(cls.method_name, "sinks", options["sinks"], 0)
        if options.get("window") is not None:
            check_int(cls.method_name, "window", options["window"], 0)

    def extra_repr(self) -> str:
        window = "fitted to share" if self.fixed_window is None else self.fixed_window
        return f"{super().extra_repr()}, sinks={self.sinks}, window={window}"

    def _window_start(self, window: int) -> Tensor:
        """Each row's window as a range of allowed-key ranks [start, start + window): ending at the
        anchor when causal, centred on it otherwise, shifted to lie inside [0, n)."""
        back = window - 1 if self.spec.causal else window // 2
        last_start = (self._counts - window).clamp(min=0)
        return torch.minimum((self._anchors - back).clamp(min=0), last_start)

    def _pairs(self, window: int) -> int:
        """Keys kept over all rows for a window: |[0, sinks) u [start, start + window)| within [0, n)."""
        n = self._counts
        sinks, local = n.clamp(max=self.sinks), n.clamp(max=window)
        start = self._window_start(window)
        overlap = (torch.minimum(sinks, start + local) - start).clamp(min=0)
        return int((sinks + local - overlap).sum())

    def _fit_window(self, len_k: int) -> int:
        """The window whose pair count comes closest to share * allowed (pairs grow with the window)."""
        target = self.share * int(self._counts.sum())
        low, high = 0, len_k  # smallest window reaching the target: in [low, high]
        while low < high:
            mid = (low + high) // 2
            if self._pairs(mid) >= target:
                high = mid
            else:
                low = mid + 1
        if low > 0 and target - self._pairs(low - 1) <= self._pairs(low) - target:
            low -= 1
        return low

    def plan(self, counts: Tensor, anchors: Tensor, len_k: int) -> None:
        self._counts, self._anchors = counts, anchors
        self.last_window = self.fixed_window if self.fixed_window is not None else self._fit_window(len_k)
        self._start = self._window_start(self.last_window)

    def columns(self, allowed: Tensor, rows: slice) -> Tensor:
        # the pattern needs no scores: only the keys some row of the chunk keeps are scored
        rank = allowed.long().cumsum(-1) - 1  # a key's index among its row's allowed keys
        start = self._start[:, rows, None]
        pattern = allowed & ((rank < self.sinks) | ((rank >= start) & (rank < start + self.last_window)))
        cols = pattern.any(dim=1).any(dim=0).nonzero().flatten()
        self._pattern = pattern[..., cols][:, None, None]  # (B, 1, 1, c, n)
        return cols

    def keep(self, scores: Tensor, allowed: Tensor, rows: slice) -> Tensor:
        return self._pattern


REFERENCES: dict[str, type[ReferenceAttention]] = {"oracle": OracleAttention, "sinks_local": SinksLocalAttention}


def sparsify_reference(model: nn.Module, args=(), kwargs=None, kind: str = "oracle", share: float = 0.25,
                       sinks: int = 4, chunk: int = DEFAULT_CHUNK) -> SparseModel:
    """`model` with every attention site rewritten to a reference (`kind` "oracle" or "sinks_local"),
    as `attnpass.sparsify` does for a method: a `SparseModel` owning a copy of `model`, sites the
    reference cannot serve (an additive bias, a general mask) left unchanged in `report.skipped`.

    `share`: the share of each row's allowed keys the oracle keeps, the overall share of pairs
    sinks_local aims at. `sinks`: sinks_local's sink count (the oracle has none). After a call,
    `measured_share(result)` is the share of pairs actually kept.
    """
    if kind not in REFERENCES:
        raise ValueError(f"unknown reference {kind!r}; choose one of {sorted(REFERENCES)}")
    site_class = REFERENCES[kind]
    options = {"share": share, "chunk": chunk, **({"sinks": sinks} if kind == "sinks_local" else {})}
    site_class.validate_options(**options)  # before the (slow) capture
    return api.rewrite_sites(model, args, kwargs, site_class, options, kind, f"reference {kind!r}",
                             "sparsify_reference")


def measured_share(model: nn.Module) -> float:
    """Pairs kept over pairs allowed in the last call of every reference site module of `model`."""
    sites = [m for m in model.modules() if isinstance(m, ReferenceAttention)]
    if not sites:
        raise ValueError("the model has no reference site modules (make it with sparsify_reference)")
    return sum(m.last_pairs for m in sites) / max(sum(m.last_allowed_pairs for m in sites), 1)
