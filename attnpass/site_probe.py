"""Looking inside a sparsified model's attention sites: their inputs, their dense attention, their pairs.

Calibration (`calibrate.py`), the fidelity report (`fidelity.py`) and `attnpass plot` all ask the
same three questions of a site:

- What does the site see? `record_site_inputs` runs the sparse model with every site computing
  the ORIGINAL dense attention (`dense_sites`), so each site's q, k, v, bias and masks are exactly
  the original model's, and records them. (With the sparse sites running, later layers would see
  inputs already changed by earlier sparse layers; that compounding is what the end-to-end cosine
  of the fidelity report measures, separately.)
- Which pairs may it attend to, and with which dense probabilities? `allowed_pairs`,
  `dense_probabilities`.
- Which pairs does a method's site module compute? `computed_pairs`, from each method's own layout
  API (Combiner `build_layout`, routing `layout()`, SBM `sample()`, Sparsefinder `predict()`).

These are measurement tools: unlike the sparse path they build (B, H, Lq, Lk) tensors on purpose,
so they are meant for calibration and evaluation lengths, not for long-context inference.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import attnpass.lowering.cpu.dense  # noqa: F401 - registers torch.ops.attnpass.attention
from attnpass.lowering.cpu.edge_attention import edges_to_dense_mask


def batch_call(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of the model call for one batch: a dict is keyword arguments, a tuple or list
    positional ones, and anything else (e.g. a tensor of token ids) the single positional argument."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def site_modules(sparse_model: nn.Module) -> dict[str, nn.Module]:
    """Site name -> site module of a model `sparsify` returned (a clear error for anything else)."""
    getter = getattr(sparse_model, "site_modules", None)
    if not callable(getter):
        raise TypeError(f"expected the model attnpass.sparsify returned, got {type(sparse_model).__name__}")
    return getter()


def _dense_forward(module: nn.Module):
    """The site's original attention: the canonical dense op with the site's scale, mask and causal rule."""

    def forward(q, k, v, bias=None, mask=None, key_keep=None, dropout_p: float = 0.0, empty_rows: str = "zero"):
        return torch.ops.attnpass.attention(
            q, k, v, bias, mask, key_keep, module.scale(q), module.spec.causal,
            module.causal_offset(q, k), 0.0, 0, empty_rows, module.spec.sdpa_semantics,
        )

    return forward


@contextlib.contextmanager
def dense_sites(sparse_model: nn.Module) -> Iterator[None]:
    """Within the block every site of `sparse_model` computes the original model's dense attention
    (no dropout), so the model is the original function again; on exit the sites are restored."""
    modules = site_modules(sparse_model)
    for module in modules.values():
        module.forward = _dense_forward(module)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


def record_site_inputs(sparse_model: nn.Module, args=(), kwargs=None) -> dict[str, dict]:
    """Site name -> the arguments (q, k, v, bias, mask, key_keep, dropout_p) the site received when
    `sparse_model(*args, **kwargs)` ran under `dense_sites` and no_grad: the original model's
    tensors at that site. Sites the call did not reach are absent."""
    modules = site_modules(sparse_model)
    recorded: dict[str, dict] = {}
    handles = []
    for name, module in modules.items():
        signature = inspect.signature(type(module).forward)

        def hook(mod, args, kwargs, name=name, signature=signature):
            bound = signature.bind(mod, *args, **kwargs)
            bound.apply_defaults()
            recorded[name] = {key: value for key, value in bound.arguments.items() if key != "self"}

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), dense_sites(sparse_model):
            sparse_model(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return recorded


# --------------------------------------------------------------------------------------------
# The site's own masking and its dense attention
# --------------------------------------------------------------------------------------------


def allowed_pairs(module: nn.Module, inputs: dict) -> Tensor:
    """(B, Hq, Lq, Lk) bool: the pairs the site's own masking allows (causal rule or band, key
    padding, bool mask, -inf bias)."""
    q, k = inputs["q"], inputs["k"]
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if module.spec.causal:
        offset = module.causal_offset(q, k)
        rows = torch.arange(Lq, device=q.device).view(Lq, 1)
        keys = torch.arange(Lk, device=q.device).view(1, Lk)
        allowed = allowed & (keys <= rows + offset)
    if module.spec.window:  # a band (sliding window): keys at distance < window
        allowed = allowed & module.band_mask(q, k)
    if inputs.get("key_keep") is not None:
        allowed = allowed & inputs["key_keep"].view(B, 1, 1, Lk).bool()
    if inputs.get("mask") is not None:
        allowed = allowed & inputs["mask"].bool()
    if inputs.get("bias") is not None:
        allowed = allowed & (inputs["bias"] > -math.inf)
    return allowed.expand(B, Hq, Lq, Lk)


def _query_rows(t: Tensor, rows) -> Tensor:
    """Query rows `rows` (None: all; a slice; a LongTensor) of a tensor broadcastable to (..., Lq, Lk)."""
    if rows is None or t.dim() < 2 or t.shape[-2] == 1:
        return t
    return t[..., rows, :] if isinstance(rows, slice) else t.index_select(t.dim() - 2, rows)


def dense_scores(module: nn.Module, inputs: dict, dtype: torch.dtype = torch.float64, rows=None) -> Tensor:
    """(B, Hq, Lq, Lk) scores of the site as the original computes them (-inf where not allowed);
    with `rows` (a slice or a LongTensor of query positions), those query rows only."""
    q, k = inputs["q"], inputs["k"]
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # GQA: query head h reads kv head h // (Hq // Hkv)
    scores = torch.matmul(_query_rows(q, rows).to(dtype), k.to(dtype).transpose(-1, -2)) * module.scale(q)
    if inputs.get("bias") is not None:
        scores = scores + _query_rows(inputs["bias"], rows).to(dtype)
    return scores.masked_fill(~_query_rows(allowed_pairs(module, inputs), rows), -math.inf)


def dense_probabilities(module: nn.Module, inputs: dict, dtype: torch.dtype = torch.float64, rows=None) -> Tensor:
    """(B, Hq, Lq, Lk) softmax probabilities of the site, or of query rows `rows` (see
    `dense_scores`); a row with no allowed key is zeros (as the kernels give)."""
    return torch.nan_to_num(torch.softmax(dense_scores(module, inputs, dtype, rows), dim=-1), nan=0.0)


# --------------------------------------------------------------------------------------------
# Which pairs a method computes
# --------------------------------------------------------------------------------------------


def _group_pairs(q_index: Tensor, k_index: Tensor, len_q: int, len_k: int, key_range: Tensor | None = None) -> Tensor:
    """(..., Lq, Lk) bool from groups (..., G, Wq) / (..., G, Wk): every query slot of group g with
    every key slot of g (-1 = empty); with key_range (..., G, Wq, 2), a query slot only with keys
    whose position is in [low, high]."""
    lead = q_index.shape[:-2]
    q_index, k_index = q_index.reshape(-1, *q_index.shape[-2:]), k_index.reshape(-1, *k_index.shape[-2:])
    N, G, Wq = q_index.shape
    Wk = k_index.shape[-1]
    qi = q_index.view(N, G, Wq, 1).expand(N, G, Wq, Wk)
    ki = k_index.view(N, G, 1, Wk).expand(N, G, Wq, Wk)
    keep = (qi >= 0) & (ki >= 0)
    if key_range is not None:
        key_range = key_range.reshape(N, G, Wq, 2)
        keep &= (ki >= key_range[..., :1]) & (ki <= key_range[..., 1:])
    n = torch.arange(N, device=q_index.device).view(N, 1, 1, 1).expand(N, G, Wq, Wk)
    out = torch.zeros(N, len_q, len_k, dtype=torch.bool, device=q_index.device)
    out[n[keep], qi[keep], ki[keep]] = True
    return out.view(*lead, len_q, len_k)


def computed_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor | None]:
    """(computed (B, Hq, Lq, Lk) bool, summaries (B, Hq, Lq) int64 or None) for a site module that
    has already run forward on `inputs` (so learned state such as routing centroids is initialised
    exactly as in that call).

    `computed` holds the (query, key) pairs whose score the method evaluates directly. For
    Combiner, `summaries` counts each query's region-summary scores: the keys reached only
    through a summary are not computed pairs (the summary stands for them all at once).
    """
    if module.method_name == "dense":
        q, k = inputs["q"], inputs["k"]
        return torch.ones(*q.shape[:3], k.shape[2], dtype=torch.bool, device=q.device), None
    anchor = getattr(module, "anchor", None)
    if not anchor:
        return _method_pairs(module, inputs)
    if not module.method_has_pairs():  # a band site whose band the anchor's window covers
        return anchor_pairs(module, inputs), None
    # the method ran on the keys the anchor leaves it (module.method_key_keep, layout_offset)
    method, summaries = _method_pairs(module, {**inputs, "key_keep": module.method_key_keep(inputs.get("key_keep"), inputs["k"])})
    return method | anchor_pairs(module, inputs), summaries


def counted_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor, float]:
    """(computed & allowed, allowed, pairs computed): the pairs as `fidelity` counts them, Combiner's
    summary scores included in the count."""
    computed, summaries = computed_pairs(module, inputs)
    allowed = allowed_pairs(module, inputs)
    computed = computed & allowed
    return computed, allowed, float(computed.sum()) + (float(summaries.sum()) if summaries is not None else 0.0)


def anchor_pairs(module: nn.Module, inputs: dict) -> Tensor:
    """(B, Hq, Lq, Lk) bool: the pairs a site's sinks and local window add (attnpass.methods.anchor)."""
    q, k, key_keep = inputs["q"], inputs["k"], inputs.get("key_keep")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    anchor, causal, offset = module.anchor, module.spec.causal, module.causal_offset(q, k)
    i = torch.arange(Lq, device=q.device).view(Lq, 1)
    j = torch.arange(Lk, device=q.device).view(1, Lk)
    sinks = anchor.sink_positions(key_keep, B, Lk, q.device)                       # (B, s)
    is_sink = (j.view(1, 1, Lk) == sinks.unsqueeze(-1)).any(dim=1)                # (B, Lk)
    pairs = is_sink.view(B, 1, 1, Lk) & ((j <= i + offset) if causal else True)
    if anchor.local:
        pairs = pairs | ((j <= i + offset) & (j > i + offset - anchor.local))
    if key_keep is not None:
        pairs = pairs & key_keep.view(B, 1, 1, Lk)
    return pairs.expand(B, Hq, Lq, Lk)


def _method_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor | None]:
    method = module.method_name
    q, k, key_keep = inputs["q"], inputs["k"], inputs.get("key_keep")
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if method == "combiner":
        return _combiner_pairs(module, inputs)
    if method == "routing":
        layout = module.layout(q, k, key_keep)
        parts = []
        if module.local_heads:
            local = _group_pairs(layout.local_q_index, layout.local_k_index, Lq, Lk)
            parts.append(local.expand(B, module.local_heads, Lq, Lk))
        if layout.q_index is not None:
            routed = _group_pairs(layout.q_index, layout.k_index, Lq, Lk)
            if layout.fallback_q_index is not None:
                routed |= _group_pairs(layout.fallback_q_index, layout.fallback_k_index, Lq, Lk,
                                       layout.fallback_key_range)
            parts.append(routed)
        return torch.cat(parts, dim=1), None
    if method == "sbm":
        # eval draws the graph from the site's seed, so sample() repeats the graph the call attended over
        graph = module.last_graph if module.last_graph is not None else module.sample(q, k, key_keep)
        return edges_to_dense_mask(graph.row_ptr, graph.col_index, B, Hq, Lq, Lk), None
    if method == "sparsefinder":
        row_ptr, col_index, _ = module.predict(q, k, key_keep)
        return edges_to_dense_mask(row_ptr, col_index, B, Hq, Lq, Lk), None
    raise ValueError(f"no pair layout is known for method {method!r}")


def _combiner_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor]:
    from attnpass.methods.combiner import _default_block
    from attnpass.methods.combiner_layout import build_layout, regions_in_band

    q, k = inputs["q"], inputs["k"]
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    causal = module.spec.causal
    offset = module.layout_offset(q, k) if causal else 0
    block = module.block if module.block is not None else _default_block(Lq, Lk, D, module.variant)
    layout = build_layout(module.variant, Lq, Lk, block, causal, offset, q.device)
    direct = _group_pairs(layout.q_index, layout.k_index, Lq, Lk).expand(B, Hq, Lq, Lk)
    # a query reads the summaries of its group's regions; a summary of a region with no key it may
    # see is not read (causal: regions after the query's own block are never listed)
    read = (layout.summary_region >= 0).unsqueeze(1)                   # (G, 1, S)
    if module.layout_window():  # at a band site, only summaries of regions inside the band
        read = read & regions_in_band(layout, offset, module.layout_window())[0, 0]
    per_slot = read.expand(*layout.q_index.shape, -1).sum(-1).reshape(-1)  # (G * Wq,)
    summaries = per_slot[layout.query_slot].view(1, 1, Lq).expand(B, Hq, Lq)
    return direct, summaries
