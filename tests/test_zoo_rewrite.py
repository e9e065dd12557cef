"""Acceptance 1 and 2 of the foundation issue, on every zoo model built offline from configs:
the sites found equal the model's attention computations, the dense rewrite reproduces the
model at the example shape and at another batch size and length, the model itself is left
untouched, and softmaxes that are not attention are not reported."""
from __future__ import annotations

import pytest
import torch

import attnpass
from tests.helpers import max_relative_error, same_state, snapshot
from tests.zoo import NEGATIVES, ZOO

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def _tol(args, kwargs) -> float:
    leaves = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    return BF16_TOL if any(t.dtype == torch.bfloat16 for t in leaves) else FP32_TOL


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.name)
def test_dense_rewrite_reproduces_model(case):
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    before = snapshot(model)
    with torch.no_grad():
        ref_before = model(*args, **kwargs)
    sparse = attnpass.sparsify(model, args, kwargs, method="dense")
    assert len(sparse.sites) == case.attention_count, str(sparse.report)
    assert not sparse.report.skipped, str(sparse.report)
    second = (3, 12) if case.dynamic else (3, 8)
    with torch.no_grad():
        for batch, length in [(2, 8), second]:
            a, kw = case.inputs(batch, length)
            err = max_relative_error(sparse(*a, **kw), model(*a, **kw))
            assert err <= _tol(a, kw), f"{case.name} at B={batch} L={length}: relative error {err:.2e}"
        # the original is untouched: same state, same mode, same outputs
        assert same_state(model, before)
        assert not model.training
        assert max_relative_error(model(*args, **kwargs), ref_before) == 0.0


@pytest.mark.parametrize("case", NEGATIVES, ids=lambda c: c.name)
def test_softmax_that_is_not_attention_is_not_reported(case):
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    report = attnpass.find_attention(model, args, kwargs)
    assert len(report.sites) == 0 and not report.skipped, str(report)
    assert "no attention found" in str(report)


HEADS = {  # (query heads, kv heads, head dim) the report must show
    "llama-eager": (4, 2, 8), "llama-sdpa": (4, 2, 8),
    "hand-gqa-repeat-interleave": (4, 2, 8), "hand-gqa-expand-reshape": (4, 2, 8),
    "hand-einsum-scaled-q": (4, 4, 8), "bert-eager": (4, 4, 8),
    "nn-mha-weights": (4, 4, 8),  # (B*H, L, D) layout: H read off the key padding vector
    # (B*H, L, D) products whose scores are viewed as (B, H, L, L): H read off the view
    "bloom-eager": (4, 4, 8), "deberta-v2-eager": (4, 4, 8),
    "longt5-local-eager": (4, 4, 8),  # blocked (B, blocks, H, l, 3l) scores: H is the dim before (l, 3l)
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_report_shows_heads_and_head_dim(name):
    from tests.zoo import by_name

    case = by_name(name)
    args, kwargs = case.inputs(2, 8)
    report = attnpass.find_attention(case.build(), args, kwargs)
    assert {(s.heads_q, s.heads_kv, s.head_dim) for s in report.sites} == {HEADS[name]}, str(report)
