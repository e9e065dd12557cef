"""ONNX lowering of a routing site: the site's own code traced, each grouped-kernel call a node.

A routing site is not bound to a method-level op. In inference with initialised centroids its layout
is tensor code of the lengths (`RoutingAttention.traces_symbolically`: the sizes the data decides,
the fallback's tiles and spans and the clusters' widths with queries="nearest", are ints read back
with bounds and kept symbolic by torch.export), so the standard exporter traces the site module's
code into standard ops: the centroids are an initializer, each cluster's members a TopK
(`attnpass::topk_lowest_index`, `ordered_topk.py`: ties to the lowest index, as in PyTorch), and each
call of the grouped kernel becomes one ``attnpass.GroupedAttention`` node (`grouped.py`): the
clusters, then the fallback windows of the queries no cluster served, and with local heads their
blocks. The file stays dynamic in L and no intermediate is L x L.

Exported: queries "balanced" or "nearest", keys "centroids", refit_steps (the per-call Lloyd steps,
traced), local heads, at self-attention sites (Lq == Lk); with the anchor's window (and sinks) at
causal sites, whose flash op becomes one BlockAttention node (`anchor.py`). Refused: keys "members"
(its members' exact scores are an op without an ONNX lowering), cross-attention, sinks without a
window, a site whose centroids no call has initialised.
"""
from __future__ import annotations

from attnpass.lowering.onnx.common import check_traced_site


def check_options(options: dict) -> None:
    if options.get("keys", "centroids") == "members":
        raise NotImplementedError("export_onnx: routing with keys='members' cannot be exported to ONNX in this "
                                  "version: the exact scores of its sampled queries (attnpass::member_key_scores, "
                                  "chunked by a data-dependent count) have no ONNX lowering")


def takes_anchor(predictor=None) -> bool:
    """A routing site exports with the anchor's sinks and window (checked per site in `bind`)."""
    return True


def bind(module) -> None:
    """Check that a routing site module (of a private copy, in eval mode) exports by tracing; its
    forward is left as it is."""
    check_options({"keys": module.keys})
    name = f"routing site {module.spec.name!r}"
    check_traced_site(module, name)
    if module.needs_first_call():
        raise ValueError(f"export_onnx: {name} has no centroids yet (they are initialised by the first call); "
                         "run or train the model before exporting it")


def nodes_per_site(module) -> int:
    """GroupedAttention nodes per site (the clusters and the fallback windows when some heads route, the
    local heads' blocks), and the anchor's sinks and window as one BlockAttention node."""
    routed = 2 if module.kmeans is not None else 0
    return routed + (1 if module.local_heads else 0) + (1 if module.anchor else 0)
