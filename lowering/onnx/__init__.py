"""ONNX lowering: attnpass ops as custom-domain nodes with model-local function bodies.

One node per rewritten attention site for the methods with a method-level node, the kernel-level
nodes of its traced code for the others; domain ``attnpass`` (version 1):

==============================  ==========================  ====================================
method                          node                        body (standard ONNX ops)
==============================  ==========================  ====================================
dense                           ``attnpass.Attention``      dense scores (L x L: dense by
                                                            definition), masked softmax
combiner (variant "fixed")      ``attnpass.GroupedAttention the site's own code traced (its
                                (two per site)              layout is tensor code of L); each
                                                            grouped-kernel call a node: groups'
                                                            query slots x key slots + summaries
routing (keys "centroids",      ``attnpass.GroupedAttention the site's own code traced (the
queries "balanced" / "nearest", (two per site: clusters,    centroids an initializer, members by
refit_steps)
                                fallback windows; one more  TopK); each grouped-kernel call a
                                for local heads, only that  node: a cluster's queries x its keys,
                                one when all are local)     an orphan query's local window
sparsefinder (clustering)       ``attnpass.Sparsefinder``   trained W_Q, W_K, centroids: member
                                                            lists of a query's top clusters (TopK),
                                                            + window / first token, deduplicated
                                                            by a per-row sort; softmax or exact
                                                            entmax-1.5 over those candidates
sparsefinder (quantization)     ``attnpass.Sparsefinder     trained W_Q, W_K: per-dim quantile
                                Quantization``              buckets (TopK sorts), r x bucket keys
                                                            per query + window; as above
sbm (eval_graph "clusters")     ``attnpass.SBM``            trained clusters and phi: memberships,
                                                            hard key clusters, each query's top
                                                            clusters by expected edge mass (TopK)
                                                            + own-position key; softmax over them
sparsefinder (blocks, softmax)  ``attnpass.ChooseBlocks``   the site's own code traced; its two
                                + ``attnpass.BlockAttention`` kernel-level ops as nodes: sampled
                                (two per site)              scores in a Loop over chunks, TopK;
                                                            candidates of each query block (chosen
                                                            keys, window, sinks), masked softmax
sbm (sampled eval graph),       -                           not lowered: export_onnx raises a
sparsefinder distance,                                      clear error (see docs/onnx.md)
combiner axial / logsparse,
routing keys "members"
==============================  ==========================  ====================================

The anchor's sinks and window (Combiner, routing, Sparsefinder's blocks) are one more
``attnpass.BlockAttention`` node per site. Two standard orderings the traced code uses become ONNX TopK
(`ordered_topk.py`): `attnpass::topk_lowest_index` and ``aten.sort.stable`` (TopK's ties go to the
lowest index).

`translation_table()` is the exporter's ``custom_translation_table``; `bind_export_forward(module)`
makes a site module call its export op; `attach_functions(model)` appends the bodies.
"""
from __future__ import annotations

from attnpass.lowering.onnx.common import DOMAIN, DOMAIN_VERSION, ONNX_OPSET

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ONNX_OPSET", "attach_functions", "bind_export_forward", "check_method",
           "needs_first_call", "nodes_per_site", "translation_table"]

def check_method(method: str, options: dict, sparse_model: bool = False) -> None:
    """Raise if `method` (with `options`) has no ONNX lowering, saying why. For a SparseModel
    (options already applied) the per-site checks happen when its sites are bound."""
    from attnpass.methods import method_class

    try:
        cls = method_class(method)
    except ValueError:
        raise ValueError(f"export_onnx: unknown method {method!r}") from None
    if sparse_model:
        return
    lowering = _lowering(cls)
    if (options.get("sinks") or options.get("local")) and not _takes_anchor(lowering, options.get("predictor")):
        raise NotImplementedError(_ANCHOR_NOT_LOWERED)
    if lowering is not None and hasattr(lowering, "check_options"):
        lowering.check_options(options)


def _lowering(cls):
    """The attnpass.lowering.onnx module that lowers a method class (`SiteAttention.onnx_lowering`), or None."""
    import importlib

    return importlib.import_module(cls.onnx_lowering) if cls.onnx_lowering else None


_ANCHOR_NOT_LOWERED = ("export_onnx: sinks= / local= (attnpass/methods/anchor.py) have no ONNX lowering in this "
                       "version except with Combiner, routing and Sparsefinder's blocks predictor; the method's node "
                       "would compute its own pairs without them")


def _takes_anchor(lowering, predictor) -> bool:
    """Whether the method's export keeps the anchor's sinks and window (Combiner, routing, Sparsefinder's blocks)."""
    return lowering is not None and hasattr(lowering, "takes_anchor") and lowering.takes_anchor(predictor)


def bind_export_forward(module) -> None:
    """Make a site module (of a private copy) call its method's export op."""
    lowering = _lowering(type(module))
    if getattr(module, "anchor", None) and not _takes_anchor(lowering, getattr(module, "predictor", None)):
        raise NotImplementedError(_ANCHOR_NOT_LOWERED)
    if lowering is None:
        raise NotImplementedError(f"export_onnx: method {module.method_name!r} has no ONNX lowering")
    if module.spec.window and not getattr(lowering, "TAKES_BAND", False):
        raise NotImplementedError(
            f"export_onnx: site {module.spec.name!r} is a band (sliding window of {module.spec.window}); "
            f"the {module.method_name} ONNX node has no band in this version (method='dense' exports it)")
    lowering.bind(module)


def nodes_per_site(module) -> int:
    """The attnpass nodes a bound site module exports: one (a method-level or the dense node), or
    the kernel-level nodes of a method whose own code is traced (Sparsefinder's blocks: two)."""
    lowering = _lowering(type(module))
    return lowering.nodes_per_site(module) if hasattr(lowering, "nodes_per_site") else 1


def needs_first_call(module) -> bool:
    """A site whose state the first call initialises (`SiteAttention.needs_first_call`)."""
    return module.needs_first_call()


def translation_table() -> dict:
    import torch

    import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention
    import attnpass.lowering.torch.grouped_attention  # noqa: F401 - registers torch.ops.attnpass.grouped_attention
    import attnpass.lowering.torch.ordered_topk  # noqa: F401 - registers torch.ops.attnpass.topk_lowest_index
    import attnpass.methods.anchor  # noqa: F401 - registers the anchor's flash op
    import attnpass.methods.sparsefinder  # noqa: F401 - registers the block predictor's ops
    from attnpass.lowering.onnx.anchor import translate_anchor_flash
    from attnpass.lowering.onnx.blocks import translate_block_flash, translate_choose_blocks
    from attnpass.lowering.onnx.dense import translate_attention
    from attnpass.lowering.onnx.grouped import translate_grouped
    from attnpass.lowering.onnx.ordered_topk import translate_stable_sort, translate_topk_lowest_index
    from attnpass.lowering.onnx.sbm import translate_sbm
    from attnpass.lowering.onnx.sparsefinder import translate_sparsefinder

    return {
        torch.ops.attnpass.attention.default: translate_attention,
        torch.ops.attnpass.grouped_attention.default: translate_grouped,
        torch.ops.attnpass.anchor_flash.default: translate_anchor_flash,
        torch.ops.attnpass.topk_lowest_index.default: translate_topk_lowest_index,
        torch.ops.aten.sort.stable: translate_stable_sort,
        torch.ops.attnpass.sparsefinder.default: translate_sparsefinder,
        torch.ops.attnpass.sbm.default: translate_sbm,
        torch.ops.attnpass.choose_blocks.default: translate_choose_blocks,
        torch.ops.attnpass.block_flash_attention.default: translate_block_flash,
    }


def _all_functions():
    from attnpass.lowering.onnx import blocks, candidates, dense, grouped, sbm, sparsefinder

    modules = (dense, grouped, candidates, sparsefinder, sbm, blocks)
    return {(f.function_ir.domain, f.name): f for m in modules for f in m.FUNCTIONS}


def attach_functions(model):
    """Append the bodies of the attnpass ops `model` (a ModelProto) uses, and their helpers, as
    model-local functions, and import the attnpass domain. Returns the model."""
    import onnx

    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", ONNX_OPSET) != ONNX_OPSET:
        raise RuntimeError(f"export_onnx: the exported model uses ONNX opset {versions['']}, but the attnpass "
                           f"function bodies are written for opset {ONNX_OPSET}")
    available = _all_functions()
    needed, todo = {}, [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    while todo:
        name = todo.pop()
        if (DOMAIN, name) in needed:
            continue
        if (DOMAIN, name) not in available:
            raise RuntimeError(f"export_onnx: no ONNX function body for node {DOMAIN}.{name}")
        proto = available[(DOMAIN, name)].to_function_proto()
        needed[(DOMAIN, name)] = proto
        todo.extend(n.op_type for n in proto.node if n.domain == DOMAIN)
    present = {(fn.domain, fn.name) for fn in model.functions}
    model.functions.extend(p for key, p in needed.items() if key not in present)
    if DOMAIN not in versions:
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
