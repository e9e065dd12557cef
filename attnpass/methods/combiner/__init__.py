"""method="combiner": full attention at sparse cost through region summaries (Ren et al. 2021).

Each query attends directly to the keys of its own block and reaches every other key it may see
through exactly one region summary, all under one softmax (see `combiner.layout` for the
variants "fixed", "axial" and "logsparse"). Summaries are max-pools of the model's own queries
and keys, so the method adds no parameters and applies to a trained model as is.

Options: ``variant`` ("fixed" by default) and ``block`` (int >= 1; by default chosen per call from
the sequence lengths). Sites with an additive bias or a general mask are declined: a summary
stands for many keys at once and cannot carry a per-pair bias or mask.
"""
from __future__ import annotations

import numbers

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnpass import cost_model
from attnpass.lowering.torch.grouped_attention import grouped_attention
from attnpass.methods.anchor import ANCHOR_OPTIONS, Anchor, check_anchor_options
from attnpass.methods.base import SiteAttention, SiteSpec
from attnpass.methods.combiner.layout import VARIANTS, build_layout, region_summaries, regions_in_band
from attnpass.methods.pairs import group_pairs

_OPTIONS = ("variant", "block") + ANCHOR_OPTIONS


class CombinerAttention(SiteAttention):
    method_name = "combiner"
    onnx_lowering = "attnpass.lowering.onnx.combiner"
    cost_formulas = "attnpass.methods.combiner.cost"
    options = _OPTIONS

    def __init__(self, spec: SiteSpec, **options):
        self.validate_options(**options)
        super().__init__(spec, Anchor.from_options(options))
        self.variant: str = options.get("variant", "fixed")
        block = options.get("block")
        self.block: int | None = None if block is None else int(block)

    @classmethod
    def validate_options(cls, **options) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"method 'combiner' got unknown option(s) {unknown}; it takes {list(_OPTIONS)}")
        check_anchor_options("combiner", options)
        variant = options.get("variant", "fixed")
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"method 'combiner': option variant={variant!r} must be one of {list(VARIANTS)}")
        block = options.get("block")
        if block is None:
            return
        if isinstance(block, bool) or not isinstance(block, numbers.Integral):
            raise TypeError(f"method 'combiner': option block={block!r} must be an int >= 1 "
                            f"(or None for the default), got {type(block).__name__}")
        if block < 1:
            raise ValueError(f"method 'combiner': option block={block!r} must be an int >= 1")

    @classmethod
    def unsupported_reason(cls, spec: SiteSpec, **options) -> str | None:
        reason = super().unsupported_reason(spec, **options)
        if reason:
            return reason
        kinds = [name for name, present in (("additive bias", spec.has_bias), ("mask", spec.has_mask)) if present]
        if not kinds:
            return None
        return (f"combiner region summaries cannot carry an arbitrary {' / '.join(kinds)} (a summary stands "
                "for many keys at once); use method='routing' or method='dense' for this site")

    def extra_repr(self) -> str:
        block = "auto" if self.block is None else self.block
        return f"{super().extra_repr()}, variant={self.variant}, block={block}"

    def _layout(self, q, k):
        """The layout of a call on (q, k): the site's variant and block (or its default), causal
        rule and layout offset."""
        Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
        causal = self.spec.causal
        block = self._block_at(Lq, Lk, D)
        return build_layout(self.variant, Lq, Lk, block, causal, self.layout_offset(q, k) if causal else 0, q.device)

    def _summaries_in_band(self, layout):
        """(1, 1, G, Wq, S) bool: the summaries a query slot may read at a band site; None elsewhere."""
        window = self.layout_window()
        return regions_in_band(layout, layout.causal_offset, window) if window else None

    def computed_pairs(self, q, k, key_keep=None):
        """The direct pairs of the layout, and per query the summaries it reads: a summary of a
        region with no key it may see is not read (causal: regions after the query's own block are
        never listed; at a band site, regions reaching out of the band)."""
        B, Hq, Lq, _ = q.shape
        layout = self._layout(q, k)
        direct = group_pairs(layout.q_index, layout.k_index, Lq, k.shape[2]).expand(B, Hq, Lq, -1)
        read = (layout.summary_region >= 0).unsqueeze(1)                         # (G, 1, S)
        in_band = self._summaries_in_band(layout)
        if in_band is not None:
            read = read & in_band[0, 0]
        per_slot = read.expand(*layout.q_index.shape, -1).sum(-1).reshape(-1)    # (G * Wq,)
        return direct, per_slot[layout.query_slot].view(1, 1, Lq).expand(B, Hq, Lq)

    def layout_traces(self, q, k, v, bias, mask, dropout_p: float) -> bool:
        """Variant fixed builds its layout as tensor code of the lengths (the default block an unbacked
        int, `cost_model.default_block`), the anchor's flash part is an op: a call traces where its
        queries are its keys (a causal one is then no decode step, whatever the lengths), with no band
        (its summaries are cut to it with host code) and no dropout (a seed drawn in Python)."""
        # an anchor must run on its flash op: its other path reads the grouped kernel's slots back by a
        # reshape of the lengths
        return (self.variant == "fixed" and not self.spec.window and not dropout_p
                and statically_known_true(q.shape[2] == k.shape[2])
                and (not self.anchor or self.anchor.runs_on_flash(bias, mask, dropout_p, q, k, v)))

    def cost_options(self, len_q: int, len_k: int, head_dim: int) -> dict:
        return {"variant": self.variant, "block": self._block_at(len_q, len_k, head_dim)}

    def cost_options_at_any_length(self, head_dim: int) -> dict | None:
        # the default block follows the lengths: left out, any block
        return {"variant": self.variant} if self.block is None else {"variant": self.variant, "block": self.block}

    def _block_at(self, len_q, len_k, head_dim):
        """The option's block, or when none was given the cost model's minimiser (fixed: sqrt(Lk))."""
        return self.block if self.block is not None else cost_model.default_block(len_q, len_k, head_dim, self.variant)

    def sparse_forward(self, q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0,
                       empty_rows: str = "zero"):  # queries with no key get zeros (SiteAttention.forward)
        return self.sparse_attention(q, k, v, bias, mask, key_keep, dropout_p)[0]

    def sparse_attention(self, q, k, v, bias, mask, key_keep, dropout_p: float):
        if bias is not None or mask is not None:
            # sparsify declines such sites (unsupported_reason); reaching here is a caller error
            raise ValueError(f"combiner site {self.spec.name!r} got a bias or mask tensor, which region "
                             "summaries cannot carry; use method='routing' or method='dense'")
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        if Lq == 0 or Lk == 0:  # no key to see: zeros, as dense attention gives
            return q.new_zeros(B, Hq, Lq, v.shape[3]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
        layout = self._layout(q, k)
        scale = self.scale(q)
        # Summaries pool the values: with the anchor's mass column they pool ones, i.e. stay ones.
        summaries = region_summaries(q, k, v, key_keep, layout, scale)
        summary_k, summary_v, summary_mask = summaries if summaries is not None else (None, None, None)
        in_band = self._summaries_in_band(layout)
        if in_band is not None and summary_mask is not None:
            summary_mask = summary_mask & in_band

        G, Wq = layout.q_index.shape
        p = dropout_p if self.training else 0.0
        out_slots, stat = grouped_attention(
            q, k, v, layout.q_index.expand(B, Hq, -1, -1), layout.k_index.expand(B, Hq, -1, -1),
            scale=scale, causal=layout.causal, causal_offset=layout.causal_offset, window=self.layout_window(),
            key_padding_mask=key_keep,
            summary_k=summary_k, summary_v=summary_v, summary_mask=summary_mask,
            dropout_p=p, dropout_seed=self.dropout_seed(p),
        )
        # Every query sits in exactly one slot: read it back instead of scattering.
        # (indexed by group and rank: a reshape to G * Wq slots leaves a guard no symbolic G satisfies)
        group = layout.query_slot // Wq
        rank = layout.query_slot - group * Wq
        return out_slots[:, :, group, rank], stat[:, :, group, rank]
