"""Acceptance 3 and 6: sites that cannot be rewritten exactly are skipped with a reason and keep
working; models without attention and malformed calls get clear messages."""
from __future__ import annotations

import pytest
import torch

import attnpass
from tests.zoo import by_name


class TwoAttentions(torch.nn.Module):
    """One ordinary attention, and one whose probabilities are also returned (cannot be sparse)."""

    def forward(self, q, k, v):
        plain = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        probs = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return plain, probs @ v, probs.mean()


def _qkv(batch=2, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 2, length, 4, generator=g) for _ in range(3))


def test_a_site_that_cannot_be_rewritten_is_skipped_with_its_reason_and_still_runs():
    model = TwoAttentions()
    sparse = attnpass.sparsify(model, _qkv())
    assert len(sparse.sites) == 1
    assert len(sparse.report.skipped) == 1
    assert "also used" in sparse.report.skipped[0].reason
    assert "skipped (left unchanged)" in str(sparse.report)
    args = _qkv(3, 11, seed=1)
    for got, want in zip(sparse(*args), model(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_without_attention_gets_a_clear_message():
    case = by_name("neg-mlp")
    args, kwargs = case.inputs(2, 8)
    report = attnpass.find_attention(case.build(), args, kwargs)
    assert "no attention found" in str(report)
    with pytest.raises(attnpass.NoAttentionFound, match="no attention to rewrite"):
        attnpass.sparsify(case.build(), args, kwargs)


def test_unknown_and_unavailable_methods_are_named():
    model = TwoAttentions()
    with pytest.raises(ValueError, match="unknown method 'flash'.*available"):
        attnpass.sparsify(model, _qkv(), method="flash")
    with pytest.raises(TypeError, match="method must be a string"):
        attnpass.sparsify(model, _qkv(), method=3)
    with pytest.raises(ValueError, match="takes no options"):
        attnpass.sparsify(model, _qkv(), method="dense", clusters=4)


def test_malformed_args_are_named():
    model = TwoAttentions()
    with pytest.raises(TypeError, match="args must be a tuple"):
        attnpass.find_attention(model, args="q")
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        attnpass.find_attention(model, args=_qkv(), kwargs=[1])
    with pytest.raises(ValueError, match="no tensor"):
        attnpass.find_attention(model, args=(1, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attnpass.find_attention(lambda x: x, args=_qkv())
    with pytest.raises(attnpass.CaptureError, match="could not capture TwoAttentions"):
        attnpass.find_attention(model, args=_qkv()[:2])


def test_a_call_with_another_structure_than_the_example_is_captured_on_first_use():
    """A new call signature (here: no padding mask, positional) is captured on first use with a
    notice and computes what the original computes (tests/test_call_surface.py has the rest)."""
    from attnpass.sparse_module import CaptureNotice

    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    model = case.build()
    sparse = attnpass.sparsify(model, args, kwargs)
    with pytest.warns(CaptureNotice), torch.no_grad():
        got = sparse(kwargs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(kwargs["input_ids"])[0], rtol=1e-5, atol=1e-5)


def test_multi_query_attention_by_broadcasting_is_reported_with_its_kv_heads():
    class MQA(torch.nn.Module):
        def forward(self, q, k, v):  # k, v: one head shared by all query heads
            return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 4, generator=g)
    k, v = torch.randn(2, 1, 8, 4, generator=g), torch.randn(2, 1, 8, 4, generator=g)
    sparse = attnpass.sparsify(MQA(), (q, k, v))
    site = sparse.sites[0]
    assert (site.heads_q, site.heads_kv) == (4, 1)
    q2, k2, v2 = torch.randn(3, 4, 11, 4), torch.randn(3, 1, 11, 4), torch.randn(3, 1, 11, 4)
    torch.testing.assert_close(sparse(q2, k2, v2), MQA()(q2, k2, v2), rtol=1e-5, atol=1e-6)


def test_keyword_inputs_may_come_in_another_order_than_the_example():
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    model = case.build()
    sparse = attnpass.sparsify(model, args, kwargs)
    reordered = dict(reversed(list(kwargs.items())))
    assert list(reordered) != list(kwargs)
    with torch.no_grad():
        torch.testing.assert_close(sparse(*args, **reordered)[0], model(*args, **kwargs)[0], rtol=1e-5, atol=1e-6)


def test_each_method_declares_the_options_it_validates():
    """`method_class(m).options` (what the CLI and docs read) is exactly what validate_options takes."""
    from attnpass.methods import METHODS as NAMES
    from attnpass.methods import method_class

    for name in NAMES:
        cls = method_class(name)
        with pytest.raises(ValueError) as refused:
            cls.validate_options(no_such_option=1)
        message = str(refused.value)
        assert "no_such_option" in message and all(repr(o) in message for o in cls.options), (name, message)
    assert method_class("dense").options == ()
    assert set(method_class("routing").options) >= {"clusters", "local_window"}
