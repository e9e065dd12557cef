"""Which dims a capture keeps symbolic (attnpass.frontend.export_shapes): a batch-1 example keeps the batch
dynamic, raw q/k/v inputs get static heads / head dim and (equal example lengths) one length
symbol; plus the method name's canonical form and sparsifying a sparsified model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnpass
import attnpass.methods
from attnpass.frontend.detect import capture_sites
from tests.helpers import max_relative_error
from tests.zoo import by_name

TOL = 1e-5


def _quiet_call(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a new call signature is captured with a notice
        with torch.no_grad():
            return model(*args, **kwargs)


# -- 1. a batch-1 example ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2-eager", "llama-sdpa", "vit-sdpa"])
def test_batch_one_example_keeps_batch_dynamic(name):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(1, 8)
    # the captured graph itself serves other batches (mask analysis probes them too)
    program = capture_sites(model, args, kwargs)
    assert program.sites and all(isinstance(s.batch, torch.SymInt) for s in program.sites), \
        [s.batch for s in program.sites]
    with torch.no_grad():
        for batch in (1, 2, 3):
            a, kw = case.inputs(batch, 8)
            assert max_relative_error(program(model, a, kw), model(*a, **kw)) <= TOL
    sparse = attnpass.sparsify(model, args, kwargs, method="dense")
    assert len(sparse.sites) == case.attention_count and not sparse.report.skipped, str(sparse.report)
    length = 12 if case.dynamic else 8
    for batch, n in [(1, 8), (2, 8), (3, 8), (3, length)]:
        a, kw = case.inputs(batch, n)
        err = max_relative_error(_quiet_call(sparse, *a, **kw), _quiet_call(model, *a, **kw))
        assert err <= TOL, f"{name} at B={batch} L={n}: {err:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_length_one_example_serves_or_refuses_in_one_line(batch):
    case = by_name("gpt2-eager")
    model = case.build()
    args, kwargs = case.inputs(batch, 1)
    sparse = attnpass.sparsify(model, args, kwargs, method="dense")
    for b, n in [(batch, 1), (2, 5), (3, 12)]:
        a, kw = case.inputs(b, n)
        try:
            got = _quiet_call(sparse, *a, **kw)
        except ValueError as e:  # refused: one line that says what to do, never an error deep in the graph
            assert "\n" not in str(e) and "sparsify with an example" in str(e), str(e)
            continue
        assert max_relative_error(got, _quiet_call(model, *a, **kw)) <= TOL


# -- 2. raw q, k, v inputs ---------------------------------------------------------------------

class SdpaQKV(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class EagerQKV(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if self.causal:
            Lq, Lk = q.shape[-2], k.shape[-2]
            keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def _qkv(batch, length, length_k=None, heads=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    length_k = length if length_k is None else length_k
    return (torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length_k, dim, generator=g),
            torch.randn(batch, heads, length_k, dim, generator=g))


RAW = [(cls, causal) for cls in (SdpaQKV, EagerQKV) for causal in (False, True)]


@pytest.mark.parametrize("cls,causal", RAW, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_raw_qkv_site_has_static_heads_and_self_layout(cls, causal):
    report = attnpass.find_attention(cls(causal), _qkv(2, 16))
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert (site.heads_q, site.heads_kv, site.head_dim, site.head_dim_v) == (4, 4, 8, 8), str(report)
    assert not site.cross and str(site.len_q) == str(site.len_k), str(report)
    assert site.mask_info.causal == causal, str(report)


@pytest.mark.parametrize("method", attnpass.METHODS)
@pytest.mark.parametrize("cls,causal", RAW, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_raw_qkv_every_method(cls, causal, method):
    model = cls(causal)
    sparse = attnpass.sparsify(model, _qkv(2, 16), method=method)
    assert len(sparse.sites) == 1 and not sparse.report.skipped, str(sparse.report)
    for batch, length in [(2, 16), (3, 24)]:
        q, k, v = _qkv(batch, length, seed=batch)
        out = _quiet_call(sparse, q, k, v)
        assert out.shape == (batch, 4, length, 8) and torch.isfinite(out).all()
        if method == "dense":
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            assert max_relative_error(out, expected) <= TOL


@pytest.mark.parametrize("cls", [SdpaQKV, EagerQKV])
def test_raw_qkv_tied_lengths_refuse_unequal_call_in_one_line(cls):
    sparse = attnpass.sparsify(cls(False), _qkv(2, 16), method="dense")
    with pytest.raises(ValueError) as err:
        _quiet_call(sparse, *_qkv(2, 16, length_k=12))
    message = str(err.value)
    assert "\n" not in message and "self-attention" in message and "'q'" in message and "'k'" in message, message


@pytest.mark.parametrize("cls", [SdpaQKV, EagerQKV])
def test_raw_qkv_unequal_example_lengths_stay_cross(cls):
    model = cls(False)
    sparse = attnpass.sparsify(model, _qkv(2, 16, length_k=12), method="dense")
    site = sparse.sites[0]
    assert site.cross and (site.heads_q, site.head_dim) == (4, 8), str(sparse.report)
    for length, length_k in [(16, 12), (10, 20), (9, 9)]:
        q, k, v = _qkv(3, length, length_k)
        assert max_relative_error(_quiet_call(sparse, q, k, v), F.scaled_dot_product_attention(q, k, v)) <= TOL


def test_raw_qkv_batch_one_example():
    sparse = attnpass.sparsify(SdpaQKV(True), _qkv(1, 16), method="dense")
    assert isinstance(sparse.sites[0].batch, torch.SymInt), str(sparse.report)
    for batch in (1, 3):
        q, k, v = _qkv(batch, 20, seed=batch)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert max_relative_error(_quiet_call(sparse, q, k, v), expected) <= TOL


# -- 3. method names ---------------------------------------------------------------------------

def test_method_name_is_canonical():
    model = SdpaQKV(False)
    sparse = attnpass.sparsify(model, _qkv(2, 16), method="Combiner")
    assert sparse.method == "combiner"
    assert "method='combiner'" in repr(sparse)
    assert attnpass.methods.canonical_method("DENSE") == "dense"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        attnpass.sparsify(model, _qkv(2, 16), method="nope")
    assert not hasattr(attnpass.methods, "PLANNED")


# -- 4. a sparsified model given again ---------------------------------------------------------

def test_sparsifying_a_sparse_model_is_one_clear_error():
    model = SdpaQKV(False)
    example = _qkv(2, 16)
    sparse = attnpass.sparsify(model, example, method="dense")
    for call in (lambda: attnpass.sparsify(sparse, example, method="combiner"),
                 lambda: attnpass.find_attention(sparse, example),
                 lambda: attnpass.sparsify(nn.Sequential(sparse), (example[0],))):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and "already sparsified" in message and "method='dense'" in message, message
        assert message.count("already sparsified") == 1
