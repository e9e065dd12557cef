"""attnpass.calibrate and attnpass.fidelity (issue 8) on small config-built models.

The real all-MiniLM-L6-v2 run (the acceptance table) is examples/calibrate_minilm.py; here:
calibration lowers the objective it reports, leaves the model's own weights bit-identical, is
reproducible, stops early, and reports pairs / recall that match independent computations; the
fidelity report is exact on exact rewrites; the new Sparsefinder softmax mode and its gold rule
are checked against dense references.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import attnpass
import zoo
from attnpass.tools import site_probe
from attnpass.methods.sparsefinder import gold as sf_gold
from helpers import same_state, snapshot

LENGTH = 24


@pytest.fixture(scope="module")
def bert():
    case = zoo.by_name("bert-sdpa")
    model = case.build()
    with torch.no_grad():
        # random weights give near-uniform attention, whose entmax graph is every key (nothing to
        # predict); sharper queries give the peaked rows a trained model has
        for name, param in model.named_parameters():
            if "attention.self.query" in name or "attention.self.key" in name:
                param.mul_(12.0)
    batches = [case.inputs(2, LENGTH)[1], case.inputs(3, LENGTH)[1]]
    return model, batches


def _sparse(model, batches, method, **options):
    torch.manual_seed(0)
    return attnpass.sparsify(model, kwargs=batches[0], method=method, **options)


def _site_state(sparse):
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in sparse.site_modules().items()}


def _own_weights(sparse):
    """The model's own parameters and buffers: everything outside the site modules."""
    return {k: v.clone() for k, v in sparse.state_dict().items() if ".attnpass." not in k}


FITTED = [
    ("routing", {"clusters": 3}),
    ("sparsefinder", {}),                                              # entmax15 gold
    ("sparsefinder", {"normalizer": "softmax", "predictor": "distance"}),  # mass gold
    ("sbm", {"clusters": 4}),
]


@pytest.mark.parametrize("method,options", FITTED, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                       for m, o in FITTED])
def test_calibration_lowers_its_objective_and_keeps_the_model_weights(bert, method, options):
    model, batches = bert
    sparse = _sparse(model, batches, method, **options)
    own, sites_before = _own_weights(sparse), _site_state(sparse)
    user_model = snapshot(model)
    report = attnpass.calibrate(sparse, batches, steps=40, lr=2e-2, progress=False, tol=0.0)
    assert report.steps == 40 and not report.converged and len(report.history) == 40
    assert len(report.sites) == 2
    for site in report.sites:
        assert site.fitted and site.method == method
        assert site.objective_after < site.objective_before, (site.name, site.objective_before, site.objective_after)
        assert 0 < site.fidelity.fraction_computed <= 1 and 0 < site.fidelity.mass_recall <= 1
    now = _own_weights(sparse)
    assert now.keys() == own.keys() and all(torch.equal(now[k], own[k]) for k in own)  # bit-identical
    assert same_state(model, user_model)  # the user's original model is not touched either
    after = _site_state(sparse)
    assert any(not torch.equal(after[s][k], sites_before[s][k]) for s in after for k in after[s])
    assert "objective before" in str(report) and "40 step(s)" in str(report)


def test_calibration_is_reproducible_and_leaves_the_global_rng_alone(bert):
    model, batches = bert
    a = _sparse(model, batches, "sparsefinder")
    b = copy.deepcopy(a)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    attnpass.calibrate(a, batches, steps=10, progress=False, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is where it was
    attnpass.calibrate(b, batches, steps=10, progress=False, seed=7)
    sa, sb = _site_state(a), _site_state(b)
    assert all(torch.equal(sa[s][k], sb[s][k]) for s in sa for k in sa[s])


def test_routing_calibration_fits_centroids_that_reproduce_under_ema(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "routing", clusters=3)
    report = attnpass.calibrate(sparse, batches, steps=30, progress=False, tol=0.0)
    for module in sparse.site_modules().values():
        km = module.kmeans
        assert bool(km.initialized)
        # the EMA state encodes the fitted centroids, so training can continue from them
        torch.testing.assert_close(km.ema_sum / (km.ema_count + km.eps).unsqueeze(-1), km.centroids)
    assert all(s.objective_after < s.objective_before for s in report.sites)


def test_early_stop_on_tolerance(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "routing", clusters=3)
    report = attnpass.calibrate(sparse, batches, steps=500, progress=False, tol=0.5, window=5)
    assert report.converged and 10 <= report.steps < 500


def test_progress_bar_shows_steps_and_objective(bert, capsys):
    model, batches = bert
    sparse = _sparse(model, batches, "sbm", clusters=4)
    attnpass.calibrate(sparse, batches, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "attnpass.calibrate" in err and "objective=" in err and "3/3" in err


def test_fidelity_progress_bar_counts_the_sites_measured(bert, capsys):
    model, batches = bert
    sparse = _sparse(model, batches, "routing", clusters=3)
    attnpass.fidelity(model, sparse, batches[:2])
    err = capsys.readouterr().err
    sites = 2 * len(sparse.site_modules())
    assert "attnpass.fidelity" in err and f"{sites}/{sites}" in err
    attnpass.fidelity(model, sparse, batches[:2], progress=False)
    assert "attnpass.fidelity" not in capsys.readouterr().err


def test_combiner_has_nothing_to_fit_but_is_measured(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "combiner", block=4)
    report = attnpass.calibrate(sparse, batches, steps=50, progress=False)
    assert report.steps == 0 and report.history == []
    for site in report.sites:
        assert not site.fitted and site.objective_before is None
        assert 0 < site.fidelity.fraction_computed < 1


def test_distance_budget_sets_the_share_of_pairs(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "sparsefinder", predictor="distance", normalizer="softmax", window=None,
                     first_token=False)
    report = attnpass.calibrate(sparse, batches, steps=5, progress=False, budget=0.3)
    for site in report.sites:
        assert abs(site.fidelity.fraction_computed - 0.3) < 0.02, site.fidelity.fraction_computed


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(steps=-1), ValueError, "steps"),
    (dict(gold="top"), ValueError, "gold"),
    (dict(mass=1.5), ValueError, "mass"),
    (dict(budget=0.0), ValueError, "budget"),
    (dict(lr=0), ValueError, "lr"),
])
def test_bad_arguments_are_named(bert, kwargs, error, words):
    model, batches = bert
    sparse = _sparse(model, batches, "sbm", clusters=4)
    with pytest.raises(error, match=words):
        attnpass.calibrate(sparse, batches, progress=False, **kwargs)


def test_bad_targets_are_named(bert):
    model, batches = bert
    with pytest.raises(TypeError, match="sparsify"):
        attnpass.calibrate(model, batches)
    sparse = _sparse(model, batches, "routing", clusters=3)
    with pytest.raises(ValueError, match="empty"):
        attnpass.calibrate(sparse, [])
    with pytest.raises(ValueError, match="budget"):
        attnpass.calibrate(sparse, batches, budget=0.3)
    clustering = _sparse(model, batches, "sparsefinder")
    with pytest.raises(ValueError, match="predictor='clustering'"):
        attnpass.calibrate(clustering, batches, budget=0.3)


# --------------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------------


def test_fidelity_of_an_exact_rewrite_is_exact(bert):
    model, batches = bert
    dense = _sparse(model, batches, "dense")
    report = attnpass.fidelity(model, dense, batches)
    assert report.batches == 2 and len(report.sites) == 2
    for s in [*report.sites, report.overall]:
        assert s.fraction_computed == 1.0
        assert s.mass_recall == pytest.approx(1.0, abs=1e-6)
        assert s.output_error < 1e-5
    assert report.cosine_mean == pytest.approx(1.0, abs=1e-6) and report.cosine_min > 1 - 1e-6


def test_fidelity_restores_modes_and_never_changes_weights(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "combiner", block=4)
    model.train()
    sparse.train()
    before_model, before_sparse = snapshot(model), snapshot(sparse)
    try:
        report = attnpass.fidelity(model, sparse, batches)
        assert model.training and sparse.training
        assert all(m.training for m in sparse.modules())
    finally:
        model.eval()
        sparse.eval()
    assert same_state(model, before_model) and same_state(sparse, before_sparse)
    assert 0 < report.cosine_mean < 1


@pytest.mark.parametrize("probability_rows", [5, 256], ids=["rows-in-chunks-of-5", "one-chunk"])
def test_fidelity_site_measures_match_an_independent_computation(bert, monkeypatch, probability_rows):
    import importlib

    # the module (attnpass.fidelity the attribute is the function)
    monkeypatch.setattr(importlib.import_module("attnpass.tools.fidelity"), "PROBABILITY_ROWS", probability_rows)
    model, batches = bert
    sparse = _sparse(model, batches, "routing", clusters=3).eval()
    report = attnpass.fidelity(None, sparse, batches[:1])
    assert report.cosine_mean is None
    recorded = site_probe.record_site_inputs(sparse, (), batches[0])
    for site in report.sites:
        inputs, module = recorded[site.name], sparse.site_modules()[site.name]
        q, k, v, keep = inputs["q"], inputs["k"], inputs["v"], inputs["key_keep"]
        B, H, L, D = q.shape
        # dense reference by hand: softmax over real keys
        scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(~keep.view(B, 1, 1, L), -math.inf)
        probs = torch.softmax(scores, -1)
        # routing's pairs from its layout: query slot x key slot of each cluster, plus fallbacks
        layout = module.layout(q, k, keep)
        pairs = torch.zeros(B, H, L, L, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for g in range(layout.q_index.shape[2]):
                    for i in layout.q_index[b, h, g].tolist():
                        for j in layout.k_index[b, h, g].tolist():
                            if i >= 0 and j >= 0:
                                pairs[b, h, i, j] = True
                if layout.fallback_q_index is not None:
                    for g in range(layout.fallback_q_index.shape[2]):
                        for w, i in enumerate(layout.fallback_q_index[b, h, g].tolist()):
                            lo, hi = layout.fallback_key_range[b, h, g, w].tolist()
                            for j in layout.fallback_k_index[b, h, g].tolist():
                                if i >= 0 and lo <= j <= hi:
                                    pairs[b, h, i, j] = True
        allowed = keep.view(B, 1, 1, L).expand(B, H, L, L)
        pairs &= allowed
        assert site.pairs_computed == int(pairs.sum()) and site.pairs_allowed == int(allowed.sum())
        assert site.mass_recall == pytest.approx(float((probs * pairs).sum() / probs.sum()), rel=1e-5)
        dense_out = probs @ v.double()
        with torch.no_grad():
            sparse_out = module(q, k, v, key_keep=keep).double()
        error = float((sparse_out - dense_out).norm() / dense_out.norm())
        assert site.output_error == pytest.approx(error, rel=1e-4)


def test_fidelity_combiner_counts_summary_scores(bert):
    model, batches = bert
    block = 4
    sparse = _sparse(model, batches, "combiner", block=block)
    report = attnpass.fidelity(None, sparse, batches[:1])
    B, L = batches[0]["input_ids"].shape
    H = 4
    real = batches[0]["attention_mask"].bool()
    # fixed, bidirectional: each query scores its own block's real keys and one summary per other block
    blocks = -(-L // block)
    direct = sum(int(real[b, (i // block) * block:(i // block + 1) * block].sum()) for b in range(B) for i in range(L))
    expected = H * (direct + B * L * (blocks - 1))
    for site in report.sites:
        assert site.pairs_computed == expected
        assert site.pairs_allowed == H * L * int(real.sum())


def test_fidelity_rejects_an_empty_batch_list(bert):
    model, batches = bert
    with pytest.raises(ValueError, match="empty"):
        attnpass.fidelity(model, _sparse(model, batches, "dense"), [])


# --------------------------------------------------------------------------------------------
# Sparsefinder's softmax mode and the mass gold rule
# --------------------------------------------------------------------------------------------


def test_gold_mass_rule_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 3, 11, 8
    q, k = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 8:] = False
    mass = 0.8
    row, col = sf_gold.gold_pairs(q, k, scale=D ** -0.5, causal=True, key_keep=keep, rule="mass", mass=mass)
    got = set(zip(row.tolist(), col.tolist()))
    expected = set()
    for b in range(B):
        for h in range(H):
            for i in range(L):
                allowed = [j for j in range(L) if j <= i and keep[b, j]]
                if not allowed:
                    continue
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h, j].double()) * D ** -0.5 for j in allowed])
                p = torch.softmax(s, 0)
                total = 0.0
                for idx in p.argsort(descending=True).tolist():
                    expected.add(((b * H + h) * L + i, allowed[idx]))
                    total += float(p[idx])
                    if total >= mass:
                        break
    assert got == expected


def test_softmax_mode_with_every_pair_predicted_is_the_dense_model(bert):
    model, batches = bert
    sparse = _sparse(model, batches, "sparsefinder", normalizer="softmax", predictor="distance",
                     threshold=1e30).eval()
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(sparse(**batch)[0], model(**batch)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options,words", [
    (dict(normalizer="sparsemax"), "normalizer"),
    (dict(normalizer="softmax", mass=0.0), "mass"),
    (dict(normalizer="softmax", mass=1.2), "mass"),
])
def test_sparsefinder_softmax_options_are_validated(bert, options, words):
    model, batches = bert
    with pytest.raises(ValueError, match=words):
        attnpass.sparsify(model, kwargs=batches[0], method="sparsefinder", **options)


def test_recorded_site_inputs_are_the_original_models(bert):
    """Sites run dense while recording, so a later layer's q, k, v are the original model's, not
    the ones a sparse earlier layer would produce."""
    model, batches = bert
    exact = site_probe.record_site_inputs(_sparse(model, batches, "dense"), (), batches[0])
    sparse = _sparse(model, batches, "combiner", block=4)
    recorded = site_probe.record_site_inputs(sparse, (), batches[0])
    assert recorded.keys() == exact.keys() and len(recorded) == 2
    for name in exact:
        for key in ("q", "k", "v", "key_keep"):
            torch.testing.assert_close(recorded[name][key], exact[name][key], rtol=1e-6, atol=1e-6)
    # and the sparse model itself is untouched afterwards: its sites compute Combiner again
    with torch.no_grad():
        out = sparse(**batches[0])[0]
        assert not torch.allclose(out, model(**batches[0])[0], atol=1e-3)


def test_sbm_keeps_a_bounded_sample_of_rows_and_fits_on_it(bert, monkeypatch):
    """At long inputs the SBM fitter keeps O(rows * Lk) probabilities per batch and site, not
    O(Lq * Lk), and the objective it estimates on those rows still falls."""
    from attnpass.tools import calibrate_fitters

    monkeypatch.setattr(calibrate_fitters, "SBM_ROWS_PER_BATCH", 7)
    model, batches = bert
    sparse = _sparse(model, batches, "sbm", clusters=4)
    module = next(iter(sparse.site_modules().values()))
    fitter = calibrate_fitters.fitter_for(module, lr=0.05, gold=None, mass=None, density_weight=0.0)
    inputs = site_probe.record_site_inputs(sparse, (), batches[0])[module.spec.name]
    data = fitter.prepare(inputs)
    B, H, L = inputs["q"].shape[:3]
    assert data["probs"].shape == (B, H, 7, inputs["k"].shape[2]) and len(set(data["rows"].tolist())) == 7
    full = site_probe.dense_probabilities(module, inputs, dtype=torch.float32)
    assert torch.equal(data["probs"], full[:, :, data["rows"]])
    report = attnpass.calibrate(sparse, batches, steps=30, progress=False)
    assert all(s.objective_after < s.objective_before for s in report.sites if s.fitted)
