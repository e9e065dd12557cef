"""The sparse methods through `attnpass.sparsify`, end to end on real model families.

Exactness anchors: with one Combiner region (block >= L) or one routing cluster, the sparse
pattern covers every allowed pair, so the rewritten model must equal the original; any slip in
how a method reads the site (scale, causal offset, padding, GQA, bias) shows up there. Beyond
that: sites the method cannot serve are reported and left unchanged, the result trains (loss
falls, gradients reach the model's own weights, routing's commitment loss through
`attnpass.aux_loss`), and its state (centroids) round-trips through `state_dict()`.
"""
from __future__ import annotations

import copy

import pytest
import torch

import attnpass
from tests.helpers import tiny_gpt2, max_relative_error, same_state, snapshot
from tests.zoo import by_name

# One configuration per method that computes every allowed pair (see the module docstring).
FULL_COVERAGE = {
    "combiner-fixed": dict(method="combiner", variant="fixed", block=4096),
    "combiner-axial": dict(method="combiner", variant="axial", block=4096),
    "combiner-logsparse": dict(method="combiner", variant="logsparse", block=4096),
    "routing": dict(method="routing", clusters=1),
}

# Encoder with key padding, decoder (causal + padding), GQA decoder, torch.nn MHA (bool padding, True = pad),
# the real MiniLM weights, an SDPA-causal hand model, cross-attention.
MODELS = ["bert-eager", "gpt2-sdpa", "llama-eager", "nn-mha-noweights", "minilm-l6-v2-sdpa",
          "hand-sdpa-causal", "hand-cross-attention"]


@pytest.mark.parametrize("config", list(FULL_COVERAGE))
@pytest.mark.parametrize("name", MODELS)
def test_full_coverage_configuration_equals_the_original(name, config):
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    sparse = attnpass.sparsify(model, args, kwargs, **FULL_COVERAGE[config])
    assert len(sparse.report.sites) == case.attention_count and not sparse.report.skipped
    # another batch and length than the example, so lengths are read at run time
    args, kwargs = case.inputs(3, 13)
    with torch.no_grad():
        expected, got = model(*args, **kwargs), sparse(*args, **kwargs)
    assert max_relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("options", [dict(method="combiner", block=4), dict(method="combiner", variant="axial", block=4),
                                     dict(method="combiner", variant="logsparse", block=2),
                                     dict(method="routing", clusters=3)],
                         ids=["combiner-fixed", "combiner-axial", "combiner-logsparse", "routing"])
def test_sparse_configuration_changes_the_output_but_stays_recognisable(options):
    """A truly sparse setting is an approximation: it differs from dense, yet each sentence embedding
    stays nearest to the dense embedding of its own input (by a margin) among the batch's.

    On the real MiniLM at L=24 with these small blocks the cosine to dense is 0.5-0.8 (against
    0.2-0.3 between different inputs): the untuned approximation of a pretrained model, which
    calibration (fidelity per site) is meant to improve.
    """
    case = by_name("minilm-l6-v2-sdpa")
    model = case.build()
    args, kwargs = case.inputs(4, 24)
    sparse = attnpass.sparsify(model, args, kwargs, **options)
    with torch.no_grad():
        expected, got = model(*args, **kwargs)[0], sparse(*args, **kwargs)[0]
    assert torch.isfinite(got).all()
    assert max_relative_error(got, expected) > 1e-3
    keep = kwargs["attention_mask"].unsqueeze(-1).to(got.dtype)

    def embed(h):
        return torch.nn.functional.normalize((h * keep).sum(1) / keep.sum(1), dim=-1)

    cosine = embed(got) @ embed(expected).T  # (sparse i, dense j)
    own = cosine.diagonal()
    others = cosine.masked_fill(torch.eye(4, dtype=torch.bool), -1).amax(dim=1)
    assert (own > others + 0.15).all(), cosine


def test_combiner_declines_sites_with_an_additive_bias_and_routing_serves_them():
    case = by_name("t5-eager")  # relative position bias on the self-attention sites
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    combiner = attnpass.sparsify(model, args, kwargs, method="combiner", block=4096)
    skipped = combiner.report.skipped
    assert skipped and all("bias" in s.reason and "combiner" in s.reason for s in skipped)
    assert len(combiner.report.sites) + len(skipped) == case.attention_count
    routing = attnpass.sparsify(model, args, kwargs, method="routing", clusters=1)
    assert len(routing.report.sites) == case.attention_count
    args, kwargs = case.inputs(3, 11)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        assert max_relative_error(combiner(*args, **kwargs), expected) < 1e-5  # skipped sites unchanged
        assert max_relative_error(routing(*args, **kwargs), expected) < 1e-5   # bias read at the pairs
    # the train-mode graph is captured on first use and declines the same sites
    combiner.train()
    assert torch.isfinite(combiner(*args, **kwargs)[0]).all()
    assert set(combiner._programs) == {False, True}


@pytest.mark.parametrize("options, message", [
    (dict(method="routing", clusters=0), "clusters"),
    (dict(method="routing", decay=1.5), "decay"),
    (dict(method="routing", local_window=0), "local_window"),
    (dict(method="combiner", variant="diagonal"), "variant"),
    (dict(method="combiner", block=0), "block"),
    (dict(method="combiner", clusters=4), "clusters"),
])
def test_bad_options_are_refused_before_capture(options, message, monkeypatch):
    def no_capture(*a, **k):
        raise AssertionError("captured before validating options")

    monkeypatch.setattr(attnpass.api, "capture_and_rewrite", no_capture)
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        attnpass.sparsify(case.build(), args, kwargs, **options)


def test_clusters_larger_than_the_example_length_is_refused():
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    with pytest.raises(ValueError, match="clusters"):
        attnpass.sparsify(case.build(), args, kwargs, method="routing", clusters=9)


# ----------------------------------------------------------------------------------------------
# Training after rewrite
# ----------------------------------------------------------------------------------------------


def _tiny_lm():
    return tiny_gpt2()

def _lm_batch(batch=4, length=32, seed=0):
    # a learnable task: each sequence repeats a random 8-token motif
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 50, (batch, 8), generator=g)
    return motif.repeat(1, length // 8)


def _lm_loss(model, ids):
    logits = model(input_ids=ids)[0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("options", [dict(method="routing", clusters=4), dict(method="combiner", block=8)],
                         ids=["routing", "combiner"])
def test_training_after_rewrite_makes_the_loss_fall(options):
    model = _tiny_lm()
    before = snapshot(model)
    ids = _lm_batch()
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, **options).train()
    opt = torch.optim.Adam(sparse.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        task = _lm_loss(sparse, ids)
        (task + attnpass.aux_loss(sparse)).backward()
        opt.step()
        losses.append(task.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert same_state(model, before) and not model.training


def test_routing_commitment_loss_reaches_the_projections():
    model = _tiny_lm()
    ids = _lm_batch()
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="routing", clusters=4)
    assert float(attnpass.aux_loss(sparse)) == 0.0  # nothing before a training call
    sparse.train()
    _lm_loss(sparse, ids)
    aux = attnpass.aux_loss(sparse)
    assert aux.item() > 0
    aux.backward()
    grad = sparse.transformer.h[0].attn.c_attn.weight.grad
    assert grad is not None and grad.abs().max() > 0
    with pytest.raises(TypeError, match="nn.Module"):
        attnpass.aux_loss("model")


def test_routing_state_round_trips_through_state_dict():
    model = _tiny_lm()
    ids = _lm_batch()
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="routing", clusters=4).train()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(3):  # moves the weights and the EMA centroids
        opt.zero_grad()
        _lm_loss(sparse, ids).backward()
        opt.step()
    state = copy.deepcopy(sparse.state_dict())
    new_keys = set(state) - set(model.state_dict())
    assert new_keys and all(".attnpass." in k for k in new_keys)
    sparse.eval()
    other = _lm_batch(2, 24, seed=5)
    with torch.no_grad():
        expected = sparse(input_ids=other)[0]
    fresh = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method="routing", clusters=4)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=other)[0], expected)


@pytest.mark.parametrize("method, sized", [("routing", True), ("sbm", True), ("sparsefinder", True),
                                           ("combiner", False), ("dense", False)])
def test_a_site_with_unknown_heads_is_declined_only_by_methods_whose_state_they_size(method, sized):
    from attnpass.methods import SiteSpec, method_class

    spec = SiteSpec(name="s", scale=None, causal=True, heads_q=None, heads_kv=None, head_dim=None,
                    example_len_q=16, example_len_k=16)
    reason = method_class(method).unsupported_reason(spec)
    assert (reason is not None and "head count and head dim are unknown" in reason) == sized
    # the anchor's own check comes first, for every method that takes it
    if method != "dense":
        bidirectional = SiteSpec(name="s", scale=None, causal=False, heads_q=4, heads_kv=4, head_dim=8)
        assert "local= is a window" in method_class(method).unsupported_reason(bidirectional, local=4)
