"""The module sparsify returns behaves like the model it came from: same call signature, same
state_dict keys, train/eval switching (dropout honoured), gradients to the model's own
parameters, state_dict round trip — and the input model is never touched."""
from __future__ import annotations

import copy

import torch
import transformers

import attnpass
from tests.helpers import max_relative_error, same_state, snapshot


def _bert(dropout: float):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, attn_implementation="eager")
    return transformers.BertModel(config).eval()


def _inputs(batch=2, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_state_dict_keys_and_submodules_match_the_original():
    model = _bert(0.1)
    sparse = attnpass.sparsify(model, kwargs=_inputs())
    assert set(sparse.state_dict()) == set(model.state_dict())
    assert isinstance(sparse.encoder.layer[0].attention.self.attnpass, attnpass.methods.SiteAttention)
    assert sparse.config is not model.config  # the copy's config, reachable as on the original
    assert sparse.config.hidden_size == 32


def test_gradients_reach_the_models_parameters_and_match_the_original():
    model = _bert(0.0).train()
    sparse = attnpass.sparsify(model, kwargs=_inputs())
    batch = _inputs(3, 11, seed=1)
    # a fixed random projection of the output: square().mean() of a LayerNorm output is ~1 whatever
    # the input, so its gradients are rounding noise that only an op-for-op copy of eager BERT matches
    weight = torch.randn(model(**batch).last_hidden_state.shape, generator=torch.Generator().manual_seed(2))
    (model(**batch).last_hidden_state * weight).sum().backward()
    (sparse(**batch).last_hidden_state * weight).sum().backward()
    ref = dict(model.named_parameters())
    # key biases get zero gradient in exact arithmetic (softmax is shift-invariant): their values
    # are rounding noise, so errors are measured against the largest gradient of the model
    scale = max(p.grad.abs().max() for p in ref.values() if p.grad is not None)
    compared = 0
    for name, p in sparse.named_parameters():
        if ref[name].grad is None:  # e.g. the pooler, unused by this loss
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        compared += 1
        err = (p.grad - ref[name].grad).abs().max() / (ref[name].grad.abs().max() + 1e-3 * scale)
        assert err < 1e-4, (name, err.item())
    assert compared >= 20


def test_train_and_eval_modes_are_both_honoured():
    model = _bert(0.5)
    batch = _inputs()
    sparse = attnpass.sparsify(model, kwargs=batch)
    with torch.no_grad():
        eval_ref = model(**batch).last_hidden_state
        assert max_relative_error(sparse(**batch).last_hidden_state, eval_ref) < 1e-5
        sparse.train()
        a, b = sparse(**batch).last_hidden_state, sparse(**batch).last_hidden_state
        assert not torch.allclose(a, b), "dropout is not active in train mode"
        sparse.eval()
        assert max_relative_error(sparse(**batch).last_hidden_state, eval_ref) < 1e-5
    assert set(sparse._programs) == {False, True}


def test_training_makes_the_loss_fall():
    model = _bert(0.0)
    sparse = attnpass.sparsify(model, kwargs=_inputs()).train()
    opt = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    batch = _inputs(4, 10, seed=3)
    target = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (sparse(**batch).last_hidden_state - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_round_trip_gives_identical_outputs():
    model = _bert(0.1)
    batch = _inputs()
    sparse = attnpass.sparsify(model, kwargs=batch)
    with torch.no_grad():
        for p in sparse.parameters():
            p.add_(0.01 * torch.randn_like(p))
        expected = sparse(**batch).last_hidden_state
    fresh = attnpass.sparsify(_bert(0.1), kwargs=batch)
    fresh.load_state_dict(copy.deepcopy(sparse.state_dict()))
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, expected)


def test_input_model_is_not_mutated():
    model = _bert(0.1)
    before = snapshot(model)
    batch = _inputs()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    report = attnpass.find_attention(model, kwargs=batch)
    sparse = attnpass.sparsify(model, kwargs=batch).train()
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    sparse(**batch).last_hidden_state.sum().backward()
    opt.step()
    assert len(report.sites) == 2
    assert same_state(model, before)
    assert not model.training
    assert not any(name.endswith("attnpass") for name, _ in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, ref)
