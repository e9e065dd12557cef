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
- Which pairs does a method's site module compute? `computed_pairs`: each method answers
  `SiteAttention.computed_pairs` from its own layout; the anchor's pairs are added here.

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

import attnpass.lowering.torch.dense  # noqa: F401 - registers torch.ops.attnpass.attention


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


def dense_scores(module: nn.Module, inputs: dict, dtype: torch.dtype = torch.float64, rows=None,
                 allowed: Tensor | None = None) -> Tensor:
    """(B, Hq, Lq, Lk) scores of the site as the original computes them (-inf where not allowed);
    with `rows` (a slice or a LongTensor of query positions), those query rows only. `allowed`:
    `allowed_pairs(module, inputs)` when the caller already holds it."""
    q, k = inputs["q"], inputs["k"]
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # GQA: query head h reads kv head h // (Hq // Hkv)
    scores = torch.matmul(_query_rows(q, rows).to(dtype), k.to(dtype).transpose(-1, -2)) * module.scale(q)
    if inputs.get("bias") is not None:
        scores = scores + _query_rows(inputs["bias"], rows).to(dtype)
    allowed = allowed_pairs(module, inputs) if allowed is None else allowed
    return scores.masked_fill(~_query_rows(allowed, rows), -math.inf)


def dense_probabilities(module: nn.Module, inputs: dict, dtype: torch.dtype = torch.float64, rows=None,
                        allowed: Tensor | None = None) -> Tensor:
    """(B, Hq, Lq, Lk) softmax probabilities of the site, or of query rows `rows` (see
    `dense_scores`); a row with no allowed key is zeros (as the kernels give)."""
    return torch.nan_to_num(torch.softmax(dense_scores(module, inputs, dtype, rows, allowed), dim=-1), nan=0.0)


# --------------------------------------------------------------------------------------------
# Which pairs a method computes
# --------------------------------------------------------------------------------------------


def computed_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor | None]:
    """(computed (B, Hq, Lq, Lk) bool, other_scores (B, Hq, Lq) int64 or None) for a site module that
    has already run forward on `inputs` (so learned state such as routing centroids is initialised
    exactly as in that call).

    `computed` holds the (query, key) pairs whose score the method evaluates directly and attends
    over. `other_scores` counts each query's further scores: Combiner's region summaries (the keys
    reached only through a summary are not computed pairs: the summary stands for them all at
    once), routing's scores that choose its clusters' keys (keys='members').
    """
    anchor = getattr(module, "anchor", None)
    if not anchor:
        return _method_pairs(module, inputs)
    if not module.method_has_pairs():  # a band site whose band the anchor's window covers
        return anchor_pairs(module, inputs), None
    # the method ran on the keys the anchor leaves it (module.method_key_keep, layout_offset)
    method, other_scores = _method_pairs(module, {**inputs, "key_keep": module.method_key_keep(inputs.get("key_keep"), inputs["k"])})
    return method | anchor_pairs(module, inputs), other_scores


def counted_pairs(module: nn.Module, inputs: dict) -> tuple[Tensor, Tensor, float]:
    """(computed & allowed, allowed, pairs computed): the pairs as `fidelity` counts them, the other
    scores a method computes (Combiner's summaries, routing's key choice) included in the count."""
    computed, other_scores = computed_pairs(module, inputs)
    allowed = allowed_pairs(module, inputs)
    computed = computed & allowed
    return computed, allowed, float(computed.sum()) + (float(other_scores.sum()) if other_scores is not None else 0.0)


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
    """The method's own pairs (and its other scores' counts), from its `computed_pairs` hook."""
    return module.computed_pairs(inputs["q"], inputs["k"], inputs.get("key_keep"))
