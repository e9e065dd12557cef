"""Guarantees under repetition: every method is bit-for-bit deterministic for a fixed seed, and no
entry point changes the user's model (parameters, buffers, mode, outputs)."""
from __future__ import annotations

import copy

import pytest
import torch

import attnpass
from tests.helpers import tiny_gpt2, same_state, snapshot

METHODS = {
    "dense": {},
    "combiner": dict(block=4),
    "routing": dict(clusters=3),
    "sbm": dict(clusters=4),
    "sparsefinder": dict(clusters=4),
}


def _tiny_lm():
    return tiny_gpt2(dropout=0.1)

def _ids(seed=0, batch=2, length=16):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def _train_step(method: str, options: dict, seed: int):
    """Build, sparsify, two training steps (dropout on, fresh graphs / k-means updates): outputs and grads."""
    sparse = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": _ids()}, method=method, **options).train()
    torch.manual_seed(seed)
    results = []
    for step in range(2):
        logits = sparse(input_ids=_ids(1 + step))[0]
        (logits.square().mean() + attnpass.aux_loss(sparse)).backward()
        results.append(logits.detach())
    results += [p.grad.clone() for p in sparse.parameters() if p.grad is not None]
    sparse.eval()
    with torch.no_grad():
        results.append(sparse(input_ids=_ids(5))[0])
    return results, sparse


@pytest.mark.parametrize("method", list(METHODS))
def test_fixed_seed_gives_bit_identical_results(method):
    first, _ = _train_step(method, METHODS[method], seed=7)
    second, _ = _train_step(method, METHODS[method], seed=7)
    assert len(first) == len(second)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # and the seed matters where the method draws randomness in training (dropout everywhere)
    other, _ = _train_step(method, METHODS[method], seed=8)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("method", list(METHODS))
def test_no_entry_point_mutates_the_input_model(method):
    model = _tiny_lm()
    ids = _ids()
    with torch.no_grad():
        before_out = model(input_ids=ids)[0]
    before = snapshot(model)
    attnpass.find_attention(model, kwargs={"input_ids": ids})
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method=method, **METHODS[method])
    sparse.train()
    (sparse(input_ids=ids)[0].sum() + attnpass.aux_loss(sparse)).backward()
    torch.optim.SGD(sparse.parameters(), lr=0.1).step()  # training the sparse model ...
    if method in ("dense", "combiner"):
        attnpass.explain(model, kwargs={"input_ids": ids}, method=method, **METHODS[method])
    # ... leaves the original's parameters, buffers, mode and outputs as they were
    assert same_state(model, before) and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(".attnpass" in name for name, _ in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids)[0], before_out)


@pytest.mark.parametrize("method", ["routing", "sbm"])
def test_a_trained_sparse_model_deep_copies_into_an_independent_equal_model(method):
    """copy.deepcopy after training (checkpointing the best model, EMA copies) must work: the
    copy computes the same function and shares nothing with the original."""
    _, sparse = _train_step(method, METHODS[method], seed=1)
    twin = copy.deepcopy(sparse)
    ids = _ids(9)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids)[0], sparse(input_ids=ids)[0])
        next(twin.parameters()).add_(1.0)
        assert not torch.equal(twin(input_ids=ids)[0], sparse(input_ids=ids)[0])
    assert set(twin.state_dict()) == set(sparse.state_dict())


# --------------------------------------------------------------------------------------------
# Bad values: NaN / inf in the inputs
# --------------------------------------------------------------------------------------------


def _site(method: str, causal: bool):
    from attnpass.methods import SiteSpec, method_class

    torch.manual_seed(0)
    spec = SiteSpec(name="site", scale=None, causal=causal, heads_q=2, heads_kv=2, head_dim=8,
                    example_len_q=16, example_len_k=16)
    return method_class(method)(spec, **METHODS[method])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_nan_inputs_propagate_like_dense_attention_and_never_poison_the_method_state(method, causal):
    """Documented behaviour: a NaN/inf token gives NaN where dense attention would (the outputs that
    read it), the call does not fail, other batch rows stay finite, and no persistent state of the
    method (centroids, EMA statistics, thresholds, parameters) takes a non-finite value."""
    site = _site(method, causal)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=gen) for _ in range(3))
    q[0, :, 3] = float("nan")
    k[0, :, 5] = float("inf")
    v[0, :, 7] = float("nan")
    for mode in ("train", "eval", "train"):
        getattr(site, mode)()
        out = site(q, k, v)
        assert torch.isfinite(out[1]).all()  # the clean batch row
        assert not torch.isfinite(out[0]).all()  # the broken one shows it, as dense attention would
        for name, t in list(site.named_parameters()) + list(site.named_buffers()):
            if t.is_floating_point() and name != "threshold_":  # an untrained threshold is +inf by design
                assert torch.isfinite(t).all(), f"{method}: {name} took a non-finite value"


def test_a_mismatched_or_corrupted_state_dict_is_refused_naming_the_entry():
    ids = _ids()
    trained = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method="routing", clusters=3)
    other = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method="routing", clusters=4)
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer\.h\.0\.attn\.attnpass\.kmeans\.centroids"):
        other.load_state_dict(trained.state_dict())
    state = trained.state_dict()
    del state["transformer.h.1.attn.attnpass.kmeans.ema_count"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*transformer\.h\.1\.attn\.attnpass\.kmeans\.ema_count"):
        other.load_state_dict(state)
    # a dense model's state lacks the method's entries: refused, not silently left at their defaults
    dense = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method="dense")
    with pytest.raises(RuntimeError, match="Missing key"):
        trained.load_state_dict(dense.state_dict())


@pytest.mark.parametrize("method", ["routing", "sbm", "sparsefinder"])
def test_sequences_shorter_or_longer_than_the_learned_state_expects(method):
    """State sized at sparsify time (routing's cluster count from the example length) still serves
    a call with fewer tokens than clusters and one much longer than the example."""
    sparse = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": _ids(length=16)}, method=method,
                               **dict(METHODS[method], **({"clusters": 8} if method != "sbm" else {})))
    with torch.no_grad():
        for length in (2, 60):
            out = sparse(input_ids=_ids(3, length=length))[0]
            assert out.shape == (2, length, 50) and torch.isfinite(out).all()
