"""The call surface of a sparsified transformers causal LM: the default call (which returns a
DynamicCache), call arguments the example did not have (captured per signature, never dropped),
arguments that cannot be served (refused in one line), methods that would run the original dense
model (refused), and parameters read at call time."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import attnpass
import attnpass.sparse_module as sparse_module
from attnpass.sparse_module import CaptureNotice
from tests.zoo import ZOO, by_name

CAUSAL_LMS = [c for c in ZOO if c.default_call]


def _no_grad_call(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


def _cache_tensors(cache):
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _sparsify(case, batch=2, length=8):
    model = case.build()
    _, kwargs = case.inputs(batch, length)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureNotice)  # sparsify itself gives no notice
        sparse = attnpass.sparsify(model, kwargs=kwargs)
    return model, sparse


@pytest.fixture(scope="module")
def llama():
    return _sparsify(by_name("llama-causallm"))


class CaptureCounter:
    def __init__(self, monkeypatch):
        self.count = 0
        real = sparse_module.capture_and_rewrite

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(sparse_module, "capture_and_rewrite", counting)


def test_the_zoo_has_the_causal_lms():
    assert {c.name for c in CAUSAL_LMS} == {"llama-causallm", "qwen2-causallm", "mistral-causallm", "gpt-neox-causallm"}


@pytest.mark.parametrize("case", CAUSAL_LMS, ids=lambda c: c.name)
def test_default_call_returns_the_originals_logits_and_cache(case):
    model, sparse = _sparsify(case)
    assert len(sparse.sites) == case.attention_count, str(sparse.report)
    for batch, length in [(2, 8), (3, 12)]:
        _, kwargs = case.inputs(batch, length)
        ref = _no_grad_call(model, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CaptureNotice)  # same signature at another size: no recapture
            out = _no_grad_call(sparse, **kwargs)
        assert type(out) is type(ref) is transformers.modeling_outputs.CausalLMOutputWithPast
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
        assert isinstance(out.past_key_values, transformers.DynamicCache)
        assert [type(layer) for layer in out.past_key_values.layers] == [type(layer) for layer in ref.past_key_values.layers]
        assert out.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length() == length
        got, expected = _cache_tensors(out.past_key_values), _cache_tensors(ref.past_key_values)
        assert len(got) == len(expected) == 2 * case.attention_count
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-causallm", "gpt-neox-causallm"])
def test_labels_give_the_originals_loss(name):
    case = by_name(name)
    model, sparse = _sparsify(case)
    _, kwargs = case.inputs(3, 10)
    labels = kwargs["input_ids"].masked_fill(kwargs["attention_mask"] == 0, -100)
    ref = _no_grad_call(model, **kwargs, labels=labels)
    with pytest.warns(CaptureNotice, match="labels"):
        out = _no_grad_call(sparse, **kwargs, labels=labels)
    assert out.loss is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_output_hidden_states_is_served(llama):
    model, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 9)
    ref = _no_grad_call(model, **kwargs, output_hidden_states=True)
    with pytest.warns(CaptureNotice, match="output_hidden_states=True"):
        out = _no_grad_call(sparse, **kwargs, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == len(ref.hidden_states) == 3
    for g, e in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_return_dict_false_and_use_cache_false_are_served(llama):
    model, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    with pytest.warns(CaptureNotice, match="return_dict=False"):
        out = _no_grad_call(sparse, **kwargs, return_dict=False)
    ref = _no_grad_call(model, **kwargs, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) == 2
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-5)


def test_a_new_signature_gives_one_notice_and_is_captured_once(monkeypatch):
    case = by_name("llama-causallm")
    model, sparse = _sparsify(case)
    counter = CaptureCounter(monkeypatch)
    _, kwargs = case.inputs(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _no_grad_call(sparse, **kwargs)                      # the example's signature: captured by sparsify
        _no_grad_call(sparse, **kwargs, labels=kwargs["input_ids"])
        _, other = case.inputs(3, 11)
        _no_grad_call(sparse, **other, labels=other["input_ids"])  # same signature, other sizes
        _no_grad_call(sparse, labels=kwargs["input_ids"], **kwargs)  # keyword order does not matter
    notices = [w for w in caught if issubclass(w.category, CaptureNotice)]
    assert len(notices) == 1, [str(w.message) for w in notices]
    message = str(notices[0].message)
    assert "labels" in message and "few seconds" in message and "\n" not in message
    assert notices[0].filename == __file__  # points at the caller's line
    assert counter.count == 1
    assert len(sparse._signatures) == 2
    # train mode is another signature: captured on its first call, once
    sparse.train()
    with pytest.warns(CaptureNotice, match="train mode"):
        sparse(**kwargs)
    sparse(**kwargs)
    assert counter.count == 2


def test_prepare_captures_ahead_of_time(monkeypatch):
    case = by_name("qwen2-causallm")
    model, sparse = _sparsify(case)
    counter = CaptureCounter(monkeypatch)
    _, kwargs = case.inputs(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureNotice)
        assert sparse.prepare(**kwargs, labels=kwargs["input_ids"]) is sparse
        assert counter.count == 1
        sparse.prepare(**kwargs, labels=kwargs["input_ids"])  # already captured: nothing to do
        assert counter.count == 1
        out = _no_grad_call(sparse, **kwargs, labels=kwargs["input_ids"])  # no notice, no capture
    assert counter.count == 1
    ref = _no_grad_call(model, **kwargs, labels=kwargs["input_ids"])
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-5)


def test_dense_entry_points_of_the_original_are_refused(llama):
    _, sparse = llama
    with pytest.raises(NotImplementedError, match="dense"):
        sparse.get_compiled_call()
    assert sparse.config is sparse._source.config  # plain attributes are still the original's


def test_output_attentions_is_refused_in_one_line(llama):
    _, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    with pytest.raises(ValueError, match="output_attentions=True is not supported on a sparsified model") as err:
        sparse(**kwargs, output_attentions=True)
    assert "\n" not in str(err.value)


def test_a_cache_passed_in_continues_a_model_sparsified_on_prompts():
    """The sites were built for the prompt's causal self-attention; a call continuing over a cache
    is the same attention (causal bottom-right over cached + new keys) and is served."""
    case = by_name("llama-causallm")
    model, sparse = _sparsify(case)
    _, kwargs = case.inputs(2, 8)
    cache = _no_grad_call(model, **kwargs).past_key_values
    step = dict(input_ids=kwargs["input_ids"][:, :3])
    ref_cache, ours = copy.deepcopy(cache), copy.deepcopy(cache)
    ref = _no_grad_call(model, **step, past_key_values=ref_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        out = _no_grad_call(sparse, **step, past_key_values=ours)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert out.past_key_values is ours and ours.get_seq_length() == 11


class _CausalUnlessTold(nn.Module):
    """Causal self-attention, or bidirectional when called with causal=False: another attention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x, causal: bool = True):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def test_a_call_whose_attention_differs_is_refused_once_in_one_line(monkeypatch):
    model = _CausalUnlessTold().eval()
    x = torch.randn(2, 6, 8)
    sparse = attnpass.sparsify(model, (x,))
    counter = CaptureCounter(monkeypatch)
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureNotice)
            with pytest.raises(ValueError, match=r"causal=False \(built for True\).*cannot be served|cannot be served.*causal=False") as err:
                sparse(x, causal=False)
        assert "\n" not in str(err.value)
    assert counter.count == 1  # the refusal is remembered


def test_a_cache_passed_in_is_served_and_updated_in_place_when_sparsified_so():
    case = by_name("llama-causallm")
    model = case.build()
    _, kwargs = case.inputs(2, 8)
    prompt = _no_grad_call(model, input_ids=kwargs["input_ids"]).past_key_values
    step = kwargs["input_ids"][:, :3]
    sparse = attnpass.sparsify(model, kwargs=dict(input_ids=step, past_key_values=copy.deepcopy(prompt)))
    ref_cache, cache = copy.deepcopy(prompt), copy.deepcopy(prompt)
    ref = _no_grad_call(model, input_ids=step, past_key_values=ref_cache)
    out = _no_grad_call(sparse, input_ids=step, past_key_values=cache)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    assert out.past_key_values is cache  # updated in place and returned, as by the original
    assert cache.get_seq_length() == 11
    for g, e in zip(_cache_tensors(cache), _cache_tensors(ref_cache)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_an_argument_the_graph_cannot_take_is_refused_by_name(llama):
    _, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    with pytest.raises(TypeError, match="argument 'attention_mask': a object cannot be passed"):
        sparse(input_ids=kwargs["input_ids"], attention_mask=object())


def test_parameters_reassigned_after_sparsify_are_used(llama):
    model, sparse = llama
    model, sparse = copy.deepcopy(model), copy.deepcopy(sparse)
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)  # the copy captures again
        _no_grad_call(sparse, **kwargs)
    torch.manual_seed(1)
    head = torch.randn_like(model.lm_head.weight)
    norm = torch.rand_like(model.model.norm.weight)
    for m in (model, sparse):
        m.lm_head.weight = nn.Parameter(head.clone())
        m.model.norm.weight = nn.Parameter(norm.clone())
    with torch.no_grad():
        sparse.model.layers[1].mlp.down_proj.weight.mul_(2)
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    ref, out = _no_grad_call(model, **kwargs), _no_grad_call(sparse, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)
    # and load_state_dict (in place) is seen too
    state = {k: v + 0.01 for k, v in model.state_dict().items() if v.is_floating_point()}
    model.load_state_dict(state, strict=False)
    sparse.load_state_dict(state, strict=False)
    torch.testing.assert_close(_no_grad_call(sparse, **kwargs).logits, _no_grad_call(model, **kwargs).logits,
                               rtol=0, atol=1e-5)


def test_parameters_are_not_looked_up_by_name_at_each_call(llama, monkeypatch):
    _, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    expected = _no_grad_call(sparse, **kwargs).logits  # resolves the graph's parameters once

    def no_lookup(*args, **kwargs):
        raise AssertionError("a parameter was looked up by its dotted name during a call")

    monkeypatch.setattr(nn.Module, "get_parameter", no_lookup)
    monkeypatch.setattr(nn.Module, "get_buffer", no_lookup)
    monkeypatch.setattr(nn.Module, "get_submodule", no_lookup)
    assert torch.equal(_no_grad_call(sparse, **kwargs).logits, expected)


def test_use_cache_false_after_the_default_call_is_served(llama):
    model, sparse = llama
    _, kwargs = by_name("llama-causallm").inputs(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        out = _no_grad_call(sparse, **kwargs, use_cache=False)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, _no_grad_call(model, **kwargs).logits, rtol=0, atol=1e-5)


def test_an_example_passing_one_tensor_twice_captures_two_inputs():
    """`sparsify(lm, kwargs={**batch, "labels": batch["input_ids"]})`: export would read both arguments
    from one graph input, so later labels would be taken for input_ids. The capture keeps them apart."""
    case = by_name("llama-causallm")
    model = case.build()
    _, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(model, kwargs={**kwargs, "labels": kwargs["input_ids"]})
    other_labels = torch.randint(3, 90, kwargs["input_ids"].shape, generator=torch.Generator().manual_seed(5))
    got = _no_grad_call(sparse, **kwargs, labels=other_labels)
    expected = _no_grad_call(model, **kwargs, labels=other_labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
