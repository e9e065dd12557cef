"""ONNX lowering of a Combiner site: the site's own code traced, each grouped-kernel call a node.

A Combiner site is not bound to a method-level op. Its layout is tensor code of the lengths
(`attnpass/methods/combiner/layout.py`; the default block, ~sqrt(L), an int read back from a tensor
and kept symbolic by torch.export), so the standard exporter traces the site module's inference code
into standard ops, and each call of the grouped kernel becomes one ``attnpass.GroupedAttention`` node
(`lowering/onnx/grouped.py`): the region summaries' values, then the main call over each block's
keys and the summaries. The file stays dynamic in L and no intermediate is L x L.

Exported: variant "fixed", at self-attention sites (Lq == Lk), without a band; with the anchor's
window (and sinks) at causal sites, whose flash op becomes one BlockAttention node (`anchor.py`).
Variants "axial" and "logsparse" build their layouts from concrete lengths (`layout.build_layout`
says why).
"""
from __future__ import annotations

from attnpass.lowering.onnx.common import check_traced_site

EXPORTABLE_VARIANTS = ("fixed",)


def check_options(options: dict) -> None:
    variant = options.get("variant", "fixed")
    if variant not in EXPORTABLE_VARIANTS:
        raise NotImplementedError(f"export_onnx: combiner variant {variant!r} cannot be exported to ONNX in this "
                                  f"version (only {list(EXPORTABLE_VARIANTS)}): its layout is built from concrete "
                                  "lengths, which the export keeps symbolic")


def takes_anchor(predictor=None) -> bool:
    """A Combiner site exports with the anchor's sinks and window (checked per site in `bind`)."""
    return True


def bind(module) -> None:
    """Check that a Combiner site module (of a private copy, in eval mode) exports by tracing; its
    forward is left as it is."""
    check_options({"variant": module.variant})
    name = f"combiner site {module.spec.name!r}"
    check_traced_site(module, name)


def nodes_per_site(module) -> int:
    """GroupedAttention nodes per site (the region summaries' values, then the main call), and the
    anchor's sinks and window as one BlockAttention node."""
    return 3 if module.anchor else 2
