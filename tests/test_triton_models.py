"""A model rewritten with each method runs end to end on the Triton kernels (forced, on CPU through
TRITON_INTERPRET=1) and matches the PyTorch kernels: the logits and the gradient of every model
parameter, on a causal decoder (tiny GPT-2) and a padded encoder (BERT).

The models run in float64, so the two paths must agree to ~1e-9: in float32, gradients that are
sums of many cancelling terms (SBM's straight-through gradient of its membership MLP is ~1e-6
against terms ~1e-3) differ by reduction order alone at the 1e-4 level, which would hide nothing
but prove little. The kernels' float32 / bfloat16 tolerances are tests/test_triton_kernels.py's.
"""
from __future__ import annotations

import pytest
import torch

import attnpass
from tests.helpers import max_relative_error, tiny_gpt2
from tests.zoo import by_name

pytest.importorskip("triton")  # an optional extra; CI installs it with .[test]

from attnpass.lowering.triton import dispatch, force_triton  # noqa: E402

METHODS = {
    "combiner-fixed": dict(method="combiner", block=4),
    "combiner-axial": dict(method="combiner", variant="axial", block=4),
    "routing": dict(method="routing", clusters=2),
    "sbm": dict(method="sbm"),
    "sparsefinder": dict(method="sparsefinder"),
}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _forward_backward(model, args, kwargs, triton: bool):
    model.zero_grad(set_to_none=True)
    with force_triton(triton):
        out = model(*args, **kwargs)
        logits = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
        g = torch.Generator().manual_seed(0)
        (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _check(sparse, args, kwargs):
    ref_logits, ref_grads = _forward_backward(sparse, args, kwargs, triton=False)  # also initialises routing
    launches = sum(dispatch.LAUNCHES.values())
    got_logits, got_grads = _forward_backward(sparse, args, kwargs, triton=True)
    assert sum(dispatch.LAUNCHES.values()) > launches, "the Triton kernels did not run"
    assert max_relative_error(got_logits, ref_logits) < 1e-9
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    # against the largest gradient of the model: some are exactly zero in exact arithmetic (a key
    # bias shifts a whole softmax row) and hold only 1e-19 rounding noise on both paths
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name in ref_grads:
        assert (got_grads[name] - ref_grads[name]).abs().max().item() <= 1e-9 * scale, name


@pytest.mark.parametrize("method", list(METHODS))
def test_causal_decoder_matches_the_pytorch_kernels(method):
    model = tiny_gpt2().double()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, **METHODS[method]).eval()
    _check(sparse, (), {"input_ids": ids})


@pytest.mark.parametrize("method", ["sbm", "sparsefinder"])
def test_padded_encoder_matches_the_pytorch_kernels(method):
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(case.build().double(), args, kwargs, **METHODS[method]).eval()
    _check(sparse, args, kwargs)
