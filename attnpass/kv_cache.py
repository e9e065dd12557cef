"""A KV cache goes through a captured graph without being copied.

transformers rebuilds a `DynamicCache` from its tensors (its pytree unflatten) by calling each
layer's `update`, which concatenates the tensors onto an empty one: a full copy of every cached key
and value. torch.export traces that unflatten into the graph for a cache passed in, and
`tree_unflatten` runs it again on the cache the graph returns, so a decode step would copy the whole
cache twice per layer, the more the longer the prompt. Here the traced copies are removed from the
graph (a concatenation with an empty tensor is its other operand) and the returned cache is rebuilt
around the graph's tensors. Also here: the caller's cache lends its tensors to the graph for the call
and adopts the returned cache's contents (the original model updates the cache passed in).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from attnpass.frontend.graph_ops import meta_val

aten = torch.ops.aten


def drop_empty_concatenations(gm: fx.GraphModule) -> int:
    """Replace `cat([empty, x])` by `x` (and drop empty operands of longer cats); returns how many.

    `torch.cat` skips a 1-D empty operand whatever the others' shapes (legacy rule), so the result
    equals the remaining operands' concatenation; it is only rewritten when that is exactly `x`'s
    shape and dtype. The result then aliases `x`: nothing in a captured graph writes into it (export
    graphs are functional)."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        parts = node.args[0]
        kept = [p for p in parts if not _is_empty_vector(p)]
        if len(kept) == len(parts) or not kept:
            continue
        out = meta_val(node)
        if len(kept) == 1:
            only = meta_val(kept[0])
            if out is None or only is None or only.dtype != out.dtype or only.shape != out.shape:
                continue
            node.replace_all_uses_with(kept[0])
        else:
            node.args = (kept, *node.args[1:])
        dropped += 1
    if dropped:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return dropped


def _is_empty_vector(node) -> bool:
    value = meta_val(node) if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == 0


def needs_cache_unflatten(spec: pytree.TreeSpec) -> bool:
    """Does this output structure hold a transformers `DynamicCache`?"""
    if spec.is_leaf():
        return False
    return _is_dynamic_cache(spec.type) or any(needs_cache_unflatten(c) for c in spec.children())


def unflatten_outputs(leaves: list, spec: pytree.TreeSpec):
    """`pytree.tree_unflatten(leaves, spec)`, except that a `DynamicCache` holds the given tensors
    instead of copies of them."""
    it = iter(leaves)
    return _unflatten(it, spec)


def _unflatten(it, spec: pytree.TreeSpec):
    if spec.is_leaf():
        return next(it)
    if _is_dynamic_cache(spec.type):
        return _cache_around(spec, [next(it) for _ in range(spec.num_leaves)])
    children = [_unflatten(it, child) for child in spec.children()]
    return pytree.SUPPORTED_NODES[spec.type].unflatten_fn(children, spec.context)


def _is_dynamic_cache(kind) -> bool:
    return getattr(kind, "__name__", "") == "DynamicCache" and getattr(kind, "__module__", "").startswith("transformers")


def _cache_around(spec: pytree.TreeSpec, values: list):
    """The cache transformers' unflatten builds, built from zero-length slices (cheap concatenations)
    and then pointed at the tensors themselves. Layers other than plain `DynamicLayer` (sliding-window
    layers keep counters the update maintains) take transformers' own unflatten."""
    placeholders = [v.narrow(-2, 0, 0) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v for v in values]
    cache = spec.unflatten(placeholders)
    names, _layout = spec.context
    lists, start = {}, 0
    for name, child in zip(names, spec.children()):
        lists[name] = values[start:start + child.num_leaves]
        start += child.num_leaves
    keys, vals = lists.get("key_cache", []), lists.get("value_cache", [])
    layers = cache.layers
    if not all(map(_plain_layer, layers)) or len(keys) > len(layers):
        return spec.unflatten(values)
    for layer, key, value in zip(layers, keys, vals):
        layer.keys, layer.values = key, value
    return cache


def _callers_caches(kwargs: dict) -> list:
    """The KV caches (objects with `.layers`) passed under transformers' argument names."""
    return [kwargs[name] for name in ("cache", "past_key_values") if hasattr(kwargs.get(name), "layers")]


def _plain_layer(layer) -> bool:
    """A `DynamicLayer`: keys and values only (a sliding-window layer also keeps counters)."""
    return type(layer).__name__ == "DynamicLayer"


def refuse_cropped_sliding_caches(kwargs: dict) -> None:
    """A sliding-window cache layer that has dropped keys cannot go through a captured graph: the
    graph rebuilds the cache from its tensors alone (transformers' pytree unflatten), so the layer's
    count of tokens seen (`cumulative_length`, which places the window) would become the number of
    keys it still holds, and the mask would cover the wrong keys. Refused in one line instead."""
    for cache in _callers_caches(kwargs):
        for i, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            if getattr(layer, "is_sliding", False) and isinstance(keys, torch.Tensor) \
                    and getattr(layer, "cumulative_length", keys.shape[-2]) != keys.shape[-2]:
                raise ValueError(
                    f"attnpass: the KV cache passed in has a sliding-window layer ({i}) that has dropped keys "
                    f"({layer.cumulative_length} tokens seen, {keys.shape[-2]} kept); a captured graph cannot carry "
                    "its token count. Continue with a plain transformers.DynamicCache() (it keeps every key; "
                    "SparseModel.generate uses one for sliding-window models)")


def plain_cache_for_sliding_windows(model, kwargs: dict):
    """The cache `generate` should start from, or None for transformers' own choice: where that
    choice would hold sliding-window layers (`refuse_cropped_sliding_caches` says why a graph cannot
    carry them once they drop keys), a plain `DynamicCache()`, which keeps every key: the same
    outputs (the band is the mask's, not the cache's), more memory past the window."""
    if any(kwargs.get(name) is not None for name in ("past_key_values", "cache")):
        return None
    config = getattr(model, "config", None)
    if config is None or kwargs.get("use_cache") is False:
        return None
    try:
        from transformers import DynamicCache

        default = DynamicCache(config=getattr(config, "get_text_config", lambda: config)())
    except Exception:  # noqa: BLE001 - a config transformers' cache does not take: its own choice
        return None
    if not any(getattr(layer, "is_sliding", False) for layer in default.layers):
        return None
    return DynamicCache()


def _new_tokens(kwargs: dict) -> int | None:
    for name, dim in (("input_ids", -1), ("inputs_embeds", -2)):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[dim]
    return None


def _count_sliding_tokens(returned, given, kwargs: dict) -> None:
    """The returned cache's sliding-window layers were rebuilt from their (cropped) tensors, which
    sets their token counts to the keys they hold: set them to the tokens seen, the given cache's
    count plus this call's new tokens, as the original's in-place update does."""
    new = _new_tokens(kwargs)
    if new is None:
        return
    before = getattr(given, "layers", None) or []
    for i, layer in enumerate(getattr(returned, "layers", [])):
        if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
            seen = getattr(before[i], "cumulative_length", 0) if i < len(before) else 0
            layer.cumulative_length = seen + new


def adopt_caches(kwargs: dict, out):
    """A cache passed in is updated in place by the original model and returned: do the same.

    The graph cannot mutate a Python cache object; it returns a new one holding the updated keys
    and values. Its contents are moved into the caller's object, which is returned in its place.
    """
    returned = getattr(out, "cache", None) if not isinstance(out, tuple) else None
    given_caches = _callers_caches(kwargs)
    if returned is not None:
        _count_sliding_tokens(returned, given_caches[0] if given_caches else None, kwargs)
    for given in given_caches:
        if returned is not None and returned is not given and type(returned) is type(given):
            given.__dict__.update(returned.__dict__)
            out.cache = given
    return out


@contextlib.contextmanager
def lent_to_graph(kwargs: dict, returns_cache: bool):
    """While the graph runs, the caller's `DynamicCache` does not hold its tensors (the graph's inputs
    do, and free each after its last use), as the original model drops each layer's old keys once
    it has concatenated the new ones. Only when the graph returns a cache (it is then adopted into the
    caller's object). On an error, every tensor the graph has not yet freed is put back (a failure
    part-way through leaves the cache part-consumed, as the original leaves it part-updated)."""
    lent = []
    if returns_cache:
        for cache in _callers_caches(kwargs):
            for layer in cache.layers:
                if _plain_layer(layer) and isinstance(getattr(layer, "keys", None), torch.Tensor):
                    lent.append((layer, weakref.ref(layer.keys), weakref.ref(layer.values)))
                    layer.keys = layer.values = None
    try:
        yield
    except BaseException as failure:
        consumed = False
        for layer, keys, values in lent:
            if layer.keys is None:
                layer.keys, layer.values = keys(), values()
                consumed |= layer.keys is None or layer.values is None
        if consumed:
            failure.add_note("attnpass: the KV cache passed to this call was partly consumed by it; start again from a fresh cache")
        raise
