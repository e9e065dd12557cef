"""A KV cache goes through the captured graph as it goes through the original model: no copy of the
cached keys and values in the graph or when the returned cache is rebuilt, and the old tensors are
released during the call (not held to its end)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import attnpass
from attnpass.frontend.capture import register_cache_pytrees
from attnpass.kv_cache import lent_to_graph, unflatten_outputs
from attnpass.sparse_module import CaptureNotice
from tests.zoo import by_name

aten = torch.ops.aten


class CatCounter(TorchDispatchMode):
    """Elements written by torch.cat in the dispatched calls."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten.cat.default:
            self.elements += out.numel()
        return out


@pytest.fixture(scope="module")
def llama():
    case = by_name("llama-causallm")
    model = case.build().eval()
    _, kwargs = case.inputs(1, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        sparse = attnpass.sparsify(model, kwargs={"input_ids": kwargs["input_ids"]}, method="dense")
    return model, sparse, kwargs["input_ids"]


def _prefill(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def test_a_decode_step_copies_no_more_than_the_original(llama):
    model, sparse, ids = llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        cache, token = _prefill(sparse, ids)
        with torch.no_grad():
            sparse(input_ids=token, past_key_values=cache, use_cache=True)  # captures the decode graph
    written = {}
    for name, m in (("original", model), ("converted", sparse)):
        cache, token = _prefill(m, ids)
        with torch.no_grad(), CatCounter() as counter:
            m(input_ids=token, past_key_values=cache, use_cache=True)
        written[name] = counter.elements
    # the cache's concatenation of the new key/value (and RoPE's halves), nothing more: before,
    # rebuilding the cache in and out of the graph copied every cached key and value twice
    assert written["converted"] == written["original"], written


def test_the_returned_cache_holds_the_graphs_tensors():
    register_cache_pytrees()
    keys = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    values = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    built = transformers.DynamicCache([(k, v) for k, v in zip(keys, values)])
    leaves, spec = pytree.tree_flatten({"logits": torch.zeros(2), "cache": built})
    out = unflatten_outputs(leaves, spec)
    want = pytree.tree_unflatten(leaves, spec)
    assert type(out["cache"]) is type(want["cache"])
    assert len(out["cache"].layers) == len(want["cache"].layers) == 3
    cached = leaves[1:]  # the cache's leaves: every layer's keys, then every layer's values
    for layer, ref, k, v in zip(out["cache"].layers, want["cache"].layers, cached[:3], cached[3:]):
        assert layer.keys is k and layer.values is v  # the tensors themselves, not copies
        assert torch.equal(ref.keys, k) and vars(layer).keys() == vars(ref).keys()
    assert out["cache"].get_seq_length() == want["cache"].get_seq_length() == 5
    assert out["logits"] is leaves[0]


def test_the_callers_cache_is_released_during_the_call_and_restored_on_an_error():
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache = transformers.DynamicCache([(keys, values)])
    keys, values = cache.layers[0].keys, cache.layers[0].values  # the cache's own (it copies what it is given)
    seen = []
    with pytest.raises(RuntimeError, match="in the graph"):
        with lent_to_graph({"past_key_values": cache}, returns_cache=True):
            seen.append(cache.layers[0].keys)
            raise RuntimeError("in the graph")
    assert seen == [None]  # the graph's inputs alone held the tensors
    assert cache.layers[0].keys is keys and cache.layers[0].values is values  # still alive: put back
    with lent_to_graph({"past_key_values": cache}, returns_cache=False):
        assert cache.layers[0].keys is keys  # a graph that returns no cache leaves it in place
    del keys, values  # now only the cache holds them: a failure after the graph freed them says so
    with pytest.raises(RuntimeError, match="in the graph") as failure:
        with lent_to_graph({"past_key_values": cache}, returns_cache=True):
            raise RuntimeError("in the graph")
    assert any("partly consumed" in note for note in failure.value.__notes__)


def test_decode_steps_match_the_original_after_the_cache_goes_through_uncopied(llama):
    model, sparse, ids = llama
    ref_cache, ref_token = _prefill(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        cache, token = _prefill(sparse, ids)
        assert torch.equal(token, ref_token)
        for _ in range(3):
            with torch.no_grad():
                out = sparse(input_ids=token, past_key_values=cache, use_cache=True)
                ref = model(input_ids=token, past_key_values=ref_cache, use_cache=True)
            assert out.past_key_values is cache  # the caller's object, updated as the original updates it
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
            for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
                torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=0, atol=1e-5)
            token = out.logits[:, -1:].argmax(-1)
