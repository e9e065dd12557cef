"""The user-facing entry points: `find_attention` and `sparsify`."""
from __future__ import annotations

import copy

import torch
from torch import nn

from attnpass.frontend.capture import check_call_inputs
from attnpass.frontend.detect import capture_sites
from attnpass.methods import SiteAttention, SiteSpec, canonical_method, method_class
from attnpass.prefill import check_prefill_queries
from attnpass.frontend.site import AttentionReport, AttentionSite
from attnpass.sparse_module import SparseModel, capture_and_rewrite


class NoAttentionFound(ValueError):
    """sparsify was asked to rewrite a model in which no attention could be rewritten."""


def find_attention(model: nn.Module, args=(), kwargs=None) -> AttentionReport:
    """Report the attention computations of `model` called as `model(*args, **kwargs)`.

    The model is captured with torch.export (non-strict, which traces with fake tensors): its
    parameters, buffers and mode are not changed. Returns an `AttentionReport` (a list of `AttentionSite`
    plus the skipped sites with reasons) that prints as a table.
    """
    _refuse_sparsified(model, "find_attention")
    args, kwargs = check_call_inputs(model, args, kwargs)
    program = capture_sites(model, args, kwargs)
    return AttentionReport(type(model).__name__, program.sites, program.skipped)


def example_int(x) -> int | None:
    """A dim as an int: itself, or the example's value behind a symbolic size; None if unknown."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else None
    return None


def one_query_over_keys(site: AttentionSite) -> bool:
    """One query over more keys in self-attention: a decode step over a KV cache. The length is
    compared only when the capture fixed it (a symbolic length compared to 1 would add a guard)."""
    return type(site.len_q) is int and site.len_q == 1 and str(site.len_k) != "1" and not site.cross


def site_spec(site: AttentionSite) -> SiteSpec:
    info = site.mask_info

    def as_int(x):
        return x if isinstance(x, int) else None

    # Causal with Lq and Lk one and the same size: top-left and bottom-right are the same rule. The
    # spec states it bottom-right, the form that also holds when the site later continues over a KV
    # cache (Lk = cached + new keys), so the graphs of those calls compare equal (sparse_module).
    # One query over more keys in self-attention (a decode step over a KV cache) sees every key: mask
    # analysis finds no causal rule there, and causal bottom-right is the same attention, stated so.
    one_query = one_query_over_keys(site)
    causal = info.causal or one_query
    bottom_right = info.causal_bottom_right or one_query or (info.causal and str(site.len_q) == str(site.len_k))
    return SiteSpec(
        name=site.name, scale=site.scale, causal=causal, causal_bottom_right=bottom_right,
        window=info.window,
        heads_q=as_int(site.heads_q), heads_kv=as_int(site.heads_kv), head_dim=as_int(site.head_dim),
        example_len_q=example_int(site.len_q), example_len_k=example_int(site.len_k), cross=site.cross,
        has_bias=bool(info.general_bias), has_mask=bool(info.general_bool),
        sdpa_semantics=site.pattern == "sdpa",
    )


def _attach(root: nn.Module, site: AttentionSite, module: nn.Module) -> None:
    """Register the site module next to the attention it replaced: `<owning module>.attnpass`."""
    try:
        owner = root.get_submodule(site.module_path) if site.module_path else root
    except AttributeError:
        owner = root
    name = "attnpass"
    i = 1
    while hasattr(owner, name):
        i += 1
        name = f"attnpass_{i}"
    owner.add_module(name, module)


def _refuse_sparsified(model, what: str) -> None:
    """One clear line for a model sparsify already returned (or one holding such a model)."""
    if not isinstance(model, nn.Module):
        return  # check_call_inputs says what is wrong
    for path, module in model.named_modules():
        if isinstance(module, SparseModel):
            where = f" (at {path!r})" if path else ""
            raise ValueError(
                f"{what}: the model is already sparsified{where} (method={module.method!r}, "
                f"{len(module.site_modules())} site(s)); pass the original model, or read its sites from "
                "sparse_model.report")


def sparsify(model: nn.Module, args=(), kwargs=None, method: str = "dense", **options) -> SparseModel:
    """Return a new module computing `model` with every attention site rewritten to `method`.

    `args`/`kwargs` are an example call (`model(*args, **kwargs)`); the result accepts calls of the
    same structure at other batch sizes and sequence lengths. `model` is not modified: the result
    owns a copy of it. Sites that cannot be rewritten (no exact match, or a site the method cannot
    serve, e.g. Combiner with an arbitrary bias) are left as they are and listed in
    `result.report.skipped` with the reason. `options` are the method's (see `attnpass.METHODS`), and
    for every method `prefill_queries`: a call continuing over a KV cache with fewer new queries than
    this runs exact dense attention (a decode step); by default the cost model decides per call
    (`attnpass.prefill`). `result.generate(...)` is transformers' generation on the rewritten graphs.
    """
    method = canonical_method(method)  # "Combiner" -> "combiner", everywhere after this
    site_class = method_class(method)
    prefill_queries = options.pop("prefill_queries", None)  # every method's: which calls are decode steps
    check_prefill_queries(prefill_queries)
    site_class.validate_options(**options)  # before the (slow) capture
    return rewrite_sites(model, args, kwargs, site_class, options, method, f"method {method!r}", "sparsify",
                         prefill_queries=prefill_queries)


def rewrite_sites(model: nn.Module, args, kwargs, site_class: type[SiteAttention], options: dict, label: str,
                  reason_prefix: str, caller: str, prefill_queries: int | None = None) -> SparseModel:
    """The steps of `sparsify` once the site class is chosen: capture a copy of `model`, bind each site
    to `site_class(spec, **options)` (attached to the copy, in its mode) or record why the class
    declines it, and return the `SparseModel` (`label` is its method name)."""
    _refuse_sparsified(model, caller)
    args, kwargs = check_call_inputs(model, args, kwargs)
    source = copy.deepcopy(model)
    site_modules: dict[str, nn.Module] = {}
    declined: dict[str, str] = {}

    def make_site(site: AttentionSite) -> nn.Module | str:
        spec = site_spec(site)
        reason = site_class.unsupported_reason(spec, **options)
        if reason:
            return f"{reason_prefix}: {reason}"
        module = site_class(spec, **options)
        module.prefill_queries = prefill_queries
        module.train(source.training)  # an eval model's sites run their eval path (no EMA step, no sampling)
        _attach(source, site, module)
        return module

    program = capture_and_rewrite(source, args, kwargs, site_modules, declined, make_site=make_site)
    report = AttentionReport(type(model).__name__, program.sites, program.skipped)
    if not program.sites:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in program.skipped)
        raise NoAttentionFound(
            f"no attention to rewrite in {type(model).__name__}"
            + (f" (skipped: {reasons})" if reasons else " (no softmax(Q K^T) V or scaled_dot_product_attention in its graph)")
        )
    return SparseModel(source, label, site_modules, declined, {source.training: program}, report)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the sparse methods' training losses from `model`'s last forward call.

    Add it to the task loss: `loss = task_loss + attnpass.aux_loss(sparse_model)`. Routing
    contributes its k-means commitment loss; methods without one contribute nothing (a zero scalar
    is returned when no site has a loss, so the sum is always valid).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aux_loss expects an nn.Module (the model sparsify returned), got {type(model).__name__}")
    terms = [loss for m in model.modules() if isinstance(m, SiteAttention) and (loss := m.aux_loss()) is not None]
    if terms:
        return torch.stack([t.reshape(()) for t in terms]).sum()
    device = next((p.device for p in model.parameters()), None)
    return torch.zeros((), device=device)
