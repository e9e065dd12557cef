"""What the pass knows about one attention computation: `AttentionSite`, and why some are skipped.

A pattern (see `attnpass.patterns`) turns graph nodes into a `SiteMatch`: where q, k, v come
from and how to bring them to the canonical layout, the scale, the pieces of the score chain
that mask or bias it, and the node whose value the attention output replaces. Mask analysis
then decides what those pieces mean (`MaskInfo`). `AttentionSite` is the user-facing summary;
it prints as one row of the report table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

# A layout adapter is a list of steps applied to a node to reach the canonical layout
# (B, H, L, D) for q/k/v, or to go from the canonical output back to the model's layout.
# Steps: ("transpose", d0, d1) | ("permute", dims) | ("unsqueeze", d) | ("squeeze", d)
#        | ("split_heads", heads)   (B*H, L, D) -> (B, H, L, D)
#        | ("merge_heads",)         (B, H, L, D) -> (B*H, L, D)
#        | ("flatten", start, end)  dims start..end merged into one (blocked layouts: (B, N, H, L, D) -> (B*N, H, L, D))
#        | ("unflatten", dim, sizes)  dim split into `sizes`, each an int, -1, or (node, d): the size of
#                                   dim d of `node` at run time (a size the graph only knows symbolically)
Adapter = list[tuple]


@dataclass
class MaskPiece:
    """One thing in the score chain that removes or shifts pairs.

    kind: "add" (an additive tensor, mask-like or a bias), "fill" (masked_fill: pairs where the
    bool tensor is True are removed), "keep" (where(cond, scores, -inf): pairs where cond is False
    are removed).
    """

    kind: str
    node: fx.Node
    coef: float = 1.0  # additive terms are scaled by any scale applied after them
    value: float = float("-inf")  # "fill" / "keep": the score a removed pair gets
    # Steps (the Adapter vocabulary) that bring the piece's value to the layout of the softmax's
    # input, for a piece added before the scores were reshaped: BLOOM's ALiBi term of a (B*H, L, L)
    # baddbmm whose scores are viewed as (B, H, L, L) before the mask and softmax.
    adapter: list = field(default_factory=list)


@dataclass
class SiteMatch:
    """Graph-level facts a pattern establishes about one attention computation."""

    pattern: str
    anchor: fx.Node            # the softmax (or SDPA) node: the site's identity in the graph
    output: fx.Node            # the node whose value the canonical attention replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_adapter: Adapter
    k_adapter: Adapter
    v_adapter: Adapter
    out_adapter: Adapter
    scale: float | None        # None: 1/sqrt(head dim), the head dim known only at run time
    scale_note: str = ""
    pieces: list[MaskPiece] = field(default_factory=list)
    causal: bool = False       # a causal flag given as such (SDPA is_causal)
    dropout_p: float = 0.0
    internal: set = field(default_factory=set)  # nodes of the chain that must have no outside users
    notes: list[str] = field(default_factory=list)
    # Leading dims of the scores before (Lq, Lk): 2 is (B, H, Lq, Lk); 1 is (B*H, Lq, Lk); 3 or more
    # is a blocked layout such as (B, blocks, H, Lq, Lk), whose leading dims the adapters merge into
    # the canonical batch
    batch_dims: int = 2
    # the probabilities are set to 0 after the softmax where a pre-softmax fill masked the scores
    # (SEW-D): a query with no allowed key gives zeros, whatever the fill value
    zeroed_where_masked: bool = False


@dataclass
class MaskInfo:
    """The masking a site applies, recovered as structure where possible.

    kind: "none" | "causal" | "key_padding" | "causal+key_padding" | "general"; with a `window`, a
    band (a sliding window): causal, or on both sides of the query at a self-attention site.
    With structure, the L x L mask tensor is no longer needed: causal is `j <= i` (top-left, as SDPA's
    is_causal) or `j <= i + Lk - Lq` (bottom-right),
    key padding reads `padding_input` (a (B, Lk) graph input; keep where `!= 0`, or where `== 0`
    when `padding_keep_zero`).
    """

    kind: str = "none"
    causal_bottom_right: bool = False  # offset Lk - Lq at run time (a query sees the keys up to its own end-aligned position)
    # A band (sliding window): keys at distance < window from the query's position; causal: the
    # window keys ending at its own, j > i + offset - window. 0: none.
    window: int = 0
    padding_input: fx.Node | None = None
    padding_keep_zero: bool = False
    heads_from_padding: int = 1   # (B*H, L, D) layouts: H, read off the padding input's batch
    general_bias: list[MaskPiece] = field(default_factory=list)   # additive pieces kept as tensors
    general_bool: list[MaskPiece] = field(default_factory=list)   # bool pieces kept as tensors
    bias_note: str = ""
    why_general: str = ""
    # What the original computes for a query with no allowed key: "zero" (SDPA's rule), or "mean",
    # the mean of V over all keys (every score of the row replaced by, or drowned in, one finite
    # masking constant such as finfo.min); "" when the probes cannot tell (the site is skipped).
    empty_rows: str = "zero"

    @property
    def causal(self) -> bool:
        return "causal" in self.kind


@dataclass
class AttentionSite:
    """One attention computation found in the model, as the report shows it."""

    name: str
    module_path: str
    module_type: str
    pattern: str
    batch: Any
    heads_q: Any
    heads_kv: Any
    len_q: Any
    len_k: Any
    head_dim: Any
    head_dim_v: Any
    layout: str
    scale: float | None
    scale_note: str
    mask: str
    bias: str
    dropout: float
    cross: bool
    dtype: str
    notes: list[str] = field(default_factory=list)
    match: SiteMatch | None = field(default=None, repr=False, compare=False)
    mask_info: MaskInfo | None = field(default=None, repr=False, compare=False)

    @property
    def gqa_groups(self) -> int:
        try:
            return int(self.heads_q) // int(self.heads_kv)
        except (TypeError, ValueError):
            return 1

    def row(self) -> dict[str, str]:
        kind = "cross" if self.cross else "self"
        heads = f"{self.heads_q}" if str(self.heads_q) == str(self.heads_kv) else f"{self.heads_q}q/{self.heads_kv}kv"
        return {
            "site": self.name,
            "pattern": self.pattern,
            "kind": kind,
            "heads": heads,
            "layout": self.layout.split(" ")[0],
            "Lq x Lk": f"{self.len_q} x {self.len_k}",
            "d": str(self.head_dim),
            "scale": ("1/sqrt(d)" if self.scale is None else f"{self.scale:.4g}")
            + (f" ({self.scale_note})" if self.scale_note else ""),
            "mask": self.mask,
            "bias": self.bias or "-",
            "dropout": f"{self.dropout:g}",
        }


@dataclass
class SkippedSite:
    """A softmax that looked like attention but cannot be rewritten exactly, and why."""

    name: str
    module_path: str
    pattern: str
    reason: str

    def row(self) -> dict[str, str]:
        return {"site": self.name, "pattern": self.pattern, "reason": self.reason}


def format_table(rows: list[dict[str, str]]) -> str:
    """A plain fixed-width table (no dependency), one line per row."""
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(width[c]) for c in cols)
    out = [line, "  ".join("-" * width[c] for c in cols)]
    out += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(out)


@dataclass
class AttentionReport:
    """What `find_attention` found: the sites it can rewrite and the ones it skipped, with reasons."""

    model_name: str
    sites: list[AttentionSite]
    skipped: list[SkippedSite]

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __getitem__(self, i):
        return self.sites[i]

    def __str__(self) -> str:
        if not self.sites and not self.skipped:
            return (f"{self.model_name}: no attention found (no softmax(Q K^T) V or "
                    f"scaled_dot_product_attention in the captured graph)")
        parts = [f"{self.model_name}: {len(self.sites)} attention site(s)"
                 + (f", {len(self.skipped)} skipped" if self.skipped else "")]
        if self.sites:
            parts.append(format_table([s.row() for s in self.sites]))
        if self.skipped:
            parts.append("skipped (left unchanged):")
            parts.append(format_table([s.row() for s in self.skipped]))
        return "\n".join(parts)

    __repr__ = __str__
