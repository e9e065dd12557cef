"""method="sparsefinder" (attnpass/methods/sparsefinder/, sparsefinder.predictors.py).

Anchors: (1) with a predictor setting that covers every pair the site equals the `entmax`
package's entmax15 on the dense scores, and any predicted graph equals dense entmax15 restricted
to exactly the predicted edges (float64, forward and gradients); (2) each predictor's edge set
equals its definition written densely here; (3) on a small entmax-1.5 attention model with real
structure, training the projections with the hinge loss reaches high recall at half the graph;
(4) end to end through `attnpass.sparsify`; (5) the metrics equal a brute-force count.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from entmax import entmax15

import attnpass
from attnpass import cost_model
from attnpass.lowering.torch.edge_attention import edges_from_pairs, edges_to_dense_mask
from attnpass.methods import SiteSpec, method_class
from attnpass.methods.sparsefinder import gold as sf_gold, metrics as sf_metrics, predictors
from attnpass.methods.sparsefinder import SparsefinderAttention, sparsefinder_metrics
from tests.helpers import tiny_gpt2, same_state, snapshot
from tests.memory_probe import no_square_tensor
from tests.zoo import by_name

SF = method_class("sparsefinder")


def make_site(heads_q=4, heads_kv=2, head_dim=8, len_q=20, len_k=None, causal=False, bottom_right=False,
              **options) -> SparsefinderAttention:
    len_k = len_q if len_k is None else len_k
    spec = SiteSpec(name="layer.attn", scale=None, causal=causal, causal_bottom_right=bottom_right, heads_q=heads_q,
                    heads_kv=heads_kv, head_dim=head_dim, example_len_q=len_q, example_len_k=len_k,
                    cross=len_q != len_k)
    return SF(spec, **options).double()


def make_inputs(B, Hq, Hkv, Lq, Lk, D, seed=0, grad=True, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = spread * torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = spread * torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def padding(B, Lk, lengths, left=False):
    pos = torch.arange(Lk)
    n = torch.tensor(lengths).view(B, 1)
    return pos >= Lk - n if left else pos < n


def structure(module, B, Hq, Lq, Lk, key_keep):
    """(B, Hq, Lq, Lk) pairs allowed by the causal rule and key padding."""
    allowed = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if module.spec.causal:
        allowed &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq if module.spec.causal_bottom_right else 0)
    if key_keep is not None:
        allowed &= key_keep[:, None, None, :]
    return allowed


def dense_entmax(q, k, v, allowed, scale, bias=None):
    """The entmax package's entmax15 over the allowed pairs of the dense scores (rows with none -> 0)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ kk.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    # a finite stand-in for -inf: the package's sort/cumsum needs finite values; 1e4 below is exact zero
    probs = entmax15(torch.where(allowed, scores, scores.detach().amin() - 1e4), dim=-1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    return probs @ vv, probs


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


# --------------------------------------------------------------------------------------------
# 1. Exactness against the entmax package
# --------------------------------------------------------------------------------------------

CASES = {
    "gqa-padding": dict(site={}, shape=(2, 4, 2, 20, 20), keep=[20, 13]),
    "causal-left-padding": dict(site={"causal": True}, shape=(2, 4, 2, 20, 20), keep=[20, 13], left=True),
    "cross-causal-bottom-right": dict(site={"causal": True, "bottom_right": True, "len_q": 12, "len_k": 20},
                                      shape=(2, 4, 2, 12, 20), keep=[20, 15]),
    "cross-bias-mask": dict(site={"len_q": 12, "len_k": 20}, shape=(2, 4, 2, 12, 20), keep=[17, 20],
                            bias=(1, 4, 12, 20), mask=(2, 1, 12, 20)),
    "gqa-mask-only": dict(site={}, shape=(2, 4, 2, 20, 20), keep=[20, 16], mask=(2, 4, 20, 20)),
    "causal-mask-merged-into-bias": dict(site={"causal": True}, shape=(2, 4, 2, 20, 20), keep=[14, 20],
                                         bias=(2, 4, 20, 20), mask=(1, 1, 20, 20)),
    "causal-bias-and-mask-larger-than-bias": dict(site={"causal": True}, shape=(2, 4, 2, 20, 20), keep=None,
                                                  bias=(1, 4, 20, 20), mask=(2, 1, 20, 20)),
}


def _case_tensors(name, seed=0):
    case = CASES[name]
    B, Hq, Hkv, Lq, Lk = case["shape"]
    q, k, v = make_inputs(B, Hq, Hkv, Lq, Lk, 8, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    keep = None if case["keep"] is None else padding(B, Lk, case["keep"], case.get("left", False))
    bias = None if "bias" not in case else torch.randn(case["bias"], generator=g, dtype=torch.float64).requires_grad_()
    mask = None if "mask" not in case else torch.rand(case["mask"], generator=g) > 0.3
    return case, (q, k, v), keep, bias, mask


@pytest.mark.parametrize("coverage", [dict(window=64), dict(predictor="distance", threshold=math.inf)],
                         ids=["window>=L", "threshold=inf"])
@pytest.mark.parametrize("name", list(CASES))
def test_full_coverage_equals_entmax15_on_the_dense_scores(name, coverage):
    case, (q, k, v), keep, bias, mask = _case_tensors(name)
    module = make_site(**case["site"], **coverage).eval()
    B, Hq, Hkv, Lq, Lk = case["shape"]
    got = module(q, k, v, bias=bias, mask=mask, key_keep=keep)
    allowed = structure(module, B, Hq, Lq, Lk, keep)
    if mask is not None:
        allowed = allowed & mask
    expected, probs = dense_entmax(q, k, v, allowed, 8 ** -0.5, bias)
    assert (probs == 0).float().mean() > 0.2  # entmax really is sparse here, so a slip would show
    assert rel(got, expected) < 1e-10
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    for a, e in zip(torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        assert rel(a, e) < 1e-9


def test_dropout_acts_on_the_entmax_probabilities_with_the_shared_pair_hash():
    from attnpass.lowering.torch.common import dropout_keep

    case, (q, k, v), keep, _, _ = _case_tensors("causal-left-padding")
    module = make_site(**case["site"], predictor="quantization", window=64).train()
    B, Hq, Hkv, Lq, Lk = case["shape"]
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), device="cpu"))  # the first draw of the call (quantization draws none)
    torch.manual_seed(3)
    got = module(q, k, v, key_keep=keep, dropout_p=0.4)
    _, probs = dense_entmax(q, k, v, structure(module, B, Hq, Lq, Lk, keep), 8 ** -0.5)
    bh = torch.arange(B * Hq).view(B, Hq, 1, 1)
    mult = dropout_keep(seed, 0.4, (bh, torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk)),
                        torch.float64)
    expected = (probs * mult) @ v.repeat_interleave(Hq // Hkv, 1)
    assert (mult == 0).any() and rel(got, expected) < 1e-10
    assert torch.equal(module.eval()(q, k, v, key_keep=keep, dropout_p=0.4), module(q, k, v, key_keep=keep))


@pytest.mark.parametrize("predictor", ["distance", "quantization", "clustering"])
@pytest.mark.parametrize("name", ["causal-left-padding", "cross-bias-mask", "gqa-padding"])
def test_any_predicted_graph_equals_dense_entmax15_on_exactly_those_edges(name, predictor):
    case, (q, k, v), keep, bias, mask = _case_tensors(name, seed=3)
    options = {"distance": dict(threshold=3.0), "quantization": dict(bucket_size=3),
               "clustering": dict(clusters=4, top_clusters=1)}[predictor]
    torch.manual_seed(0)
    module = make_site(**case["site"], predictor=predictor, window=None, first_token=False, rank=2, **options).eval()
    B, Hq, Hkv, Lq, Lk = case["shape"]
    row_ptr, col, _ = module.predict(q, k, keep)
    edges = edges_to_dense_mask(row_ptr, col, B, Hq, Lq, Lk)
    allowed = structure(module, B, Hq, Lq, Lk, keep) & edges
    assert 0.05 < edges.float().mean() < 0.8  # a real, partial graph
    if mask is not None:
        allowed = allowed & mask
    got = module(q, k, v, bias=bias, mask=mask, key_keep=keep)
    expected, _ = dense_entmax(q, k, v, allowed, 8 ** -0.5, bias)
    assert rel(got, expected) < 1e-10
    inputs = [t for t in (q, k, v, bias) if t is not None]
    for a, e in zip(torch.autograd.grad(got.square().sum(), inputs), torch.autograd.grad(expected.square().sum(), inputs)):
        assert rel(a, e) < 1e-9


@pytest.mark.parametrize("name", ["causal-left-padding", "cross-bias-mask", "gqa-padding"])
def test_quantization_block_path_is_the_edge_kernel_on_the_predicted_csr(name):
    """On CPU the quantization predictor runs `quantile_bucket_attention` (blocks, no per-edge
    gathers); with its default window and first-token edges it must be the very function the edge
    kernel computes on `predict`'s CSR."""
    from attnpass.lowering.torch.edge_attention import edge_attention

    case, (q, k, v), keep, bias, mask = _case_tensors(name, seed=5)
    torch.manual_seed(0)
    module = make_site(**case["site"], predictor="quantization", bucket_size=3, rank=3).eval()
    assert module.window == 1 and module.first_token
    got = module(q, k, v, bias=bias, mask=mask, key_keep=keep)
    row_ptr, col, _ = module.predict(q, k, keep)
    allowed_bias = bias  # the mask as a -inf bias: masked pairs leave the edge kernel's rows
    if mask is not None:
        allowed_bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
        allowed_bias = allowed_bias if bias is None else allowed_bias + bias
    want, _ = edge_attention(q, k, v, row_ptr, col, scale=8 ** -0.5, causal=module.spec.causal,
                             causal_offset=module.causal_offset(q, k), key_padding_mask=keep, bias=allowed_bias,
                             normalizer="entmax15")
    assert rel(got, want) < 1e-10
    inputs = [t for t in (q, k, v, bias) if t is not None]
    for a, e in zip(torch.autograd.grad(got.square().sum(), inputs), torch.autograd.grad(want.square().sum(), inputs)):
        assert rel(a, e) < 1e-9


# --------------------------------------------------------------------------------------------
# 2. Each predictor's edge set against its dense definition
# --------------------------------------------------------------------------------------------


def _dense_allowed(B, H, Lq, Lk, causal, offset, keep):
    a = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if causal:
        a &= torch.ones(Lq, Lk, dtype=torch.bool).tril(offset)
    if keep is not None:
        a &= keep[:, None, None, :]
    return a


def _edges(row, col, B, H, Lq, Lk):
    row_ptr, col_index = edges_from_pairs(row, col, B * H * Lq)
    return edges_to_dense_mask(row_ptr, col_index, B, H, Lq, Lk)


GEOMETRIES = [(False, 0, 16, 16), (True, 0, 16, 16), (True, 7, 9, 16), (False, 0, 9, 23)]


@pytest.mark.parametrize("causal, offset, Lq, Lk", GEOMETRIES)
def test_predictors_equal_their_dense_definitions(causal, offset, Lq, Lk):
    B, H, r = 2, 3, 3
    g = torch.Generator().manual_seed(Lq + Lk)
    qp = torch.randn(B, H, Lq, r, generator=g, dtype=torch.float64)
    kp = torch.randn(B, H, Lk, r, generator=g, dtype=torch.float64)
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[1, 3] = keep[1, -4:] = False
    allowed = _dense_allowed(B, H, Lq, Lk, causal, offset, keep)
    common = dict(causal=causal, causal_offset=offset, key_keep=keep)

    # distance
    t = 1.3
    got = _edges(*predictors.distance_pairs(qp, kp, t, **common), B, H, Lq, Lk)
    assert torch.equal(got, (torch.cdist(qp, kp) < t) & allowed)

    # quantization: per dim, query rank -> bucket rank * n_buckets // Lq; real key rank -> rank // size
    size = 4
    expected = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        real = keep[b].nonzero().flatten().tolist()
        n_buckets = -(-len(real) // size)
        for h in range(H):
            for d in range(r):
                q_rank = {i: rank for rank, i in enumerate(sorted(range(Lq), key=lambda i: float(qp[b, h, i, d])))}
                k_rank = {j: rank for rank, j in enumerate(sorted(real, key=lambda j: float(kp[b, h, j, d])))}
                for i in range(Lq):
                    for j in real:
                        if q_rank[i] * n_buckets // Lq == k_rank[j] // size:
                            expected[b, h, i, j] = True
    got = _edges(*predictors.quantization_pairs(qp, kp, size, **common), B, H, Lq, Lk)
    assert torch.equal(got, expected & allowed)
    assert 0.05 < got.float().mean() < 0.9

    # clustering: shared one of the top-2 nearest of 5 centroids
    centroids = torch.randn(H, 5, r, generator=g, dtype=torch.float64)
    q_top = torch.cdist(qp, centroids.unsqueeze(0).expand(B, -1, -1, -1)).topk(2, largest=False).indices
    k_top = torch.cdist(kp, centroids.unsqueeze(0).expand(B, -1, -1, -1)).topk(2, largest=False).indices
    share = (q_top[:, :, :, None, :, None] == k_top[:, :, None, :, None, :]).any(-1).any(-1)
    got = _edges(*predictors.clustering_pairs(qp, kp, centroids, 2, **common), B, H, Lq, Lk)
    assert torch.equal(got, share & allowed)

    # window (in key space) and first token
    i = torch.arange(Lq).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    anchor = i + offset if causal else i * Lk // Lq
    expected = ((anchor - j).abs() <= 2) | (j == 0)
    got = _edges(*predictors.window_pairs(B, H, Lq, Lk, 2, True, device=None, **common), B, H, Lq, Lk)
    assert torch.equal(got, expected & allowed)


def test_gold_graph_is_the_support_of_entmax15():
    B, Hq, Hkv, L = 2, 4, 2, 24
    q, k, _ = make_inputs(B, Hq, Hkv, L, L, 8, seed=2, grad=False)
    keep = padding(B, L, [24, 17])
    bias = torch.randn(1, Hq, L, L, dtype=torch.float64)
    mask = torch.rand(B, 1, L, L) > 0.2
    allowed = _dense_allowed(B, Hq, L, L, True, 0, keep) & mask
    _, probs = dense_entmax(q, k, k, allowed, 0.3, bias)
    row, col = sf_gold.gold_pairs(q, k, scale=0.3, causal=True, key_keep=keep, bias=bias, mask=mask)
    assert torch.equal(_edges(row, col, B, Hq, L, L), probs > 0)


# --------------------------------------------------------------------------------------------
# 3. Acceptance: a small entmax-1.5 attention model with structure, L = 512
# --------------------------------------------------------------------------------------------


def entmax_model_qk(batch: int, seed: int, L=512, H=2, D=16, E=32, V=64):
    """q, k of one entmax-1.5 attention layer over token + sinusoidal position embeddings.

    Tokens are Zipf-distributed (vocab 64, so tokens repeat); x = emb(token) + pos(t); q = x W_Q,
    k = x W_K with random W_Q and W_K = W_Q + 0.3 * noise, i.e. attention that prefers similar
    content and nearby positions, plus a random part: the mixture of content and local heads
    seen in trained models, with ~11 gold keys per query (2% of the row). The weights are fixed
    (seed 0); `seed` draws the token sequence.
    """
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(V, E, generator=g)
    t = torch.arange(L).unsqueeze(1)
    freq = torch.exp(-math.log(1000.0) * torch.arange(0, E, 2) / E)
    pos = torch.zeros(L, E)
    pos[:, 0::2], pos[:, 1::2] = torch.sin(t * freq), torch.cos(t * freq)
    w_q = torch.randn(E, H * D, generator=g) / math.sqrt(E)
    w_k = w_q + 0.3 * torch.randn(E, H * D, generator=g) / math.sqrt(E)
    tokens = torch.multinomial(1.0 / torch.arange(1, V + 1).float(), batch * L, replacement=True,
                               generator=torch.Generator().manual_seed(seed)).view(batch, L)
    x = emb[tokens] + pos
    return ((x @ w_q).view(batch, L, H, D).transpose(1, 2), (x @ w_k).view(batch, L, H, D).transpose(1, 2))


def test_acceptance_trained_projections_find_the_entmax_graph_at_512(capsys):
    L, H, D = 512, 2, 16
    q, k = entmax_model_qk(1, seed=1)          # training data
    q_test, k_test = entmax_model_qk(2, seed=2)  # held-out sequences
    spec = SiteSpec(name="acceptance", scale=None, heads_q=H, heads_kv=H, head_dim=D, example_len_q=L, example_len_k=L)
    settings = {"distance": {}, "quantization": dict(bucket_size=16), "clustering": dict(clusters=16, top_clusters=2)}
    torch.manual_seed(0)
    modules = {name: SF(spec, predictor=name, **opts) for name, opts in settings.items()}
    init = copy.deepcopy(modules["distance"].state_dict())
    for m in modules.values():  # the same initial projections everywhere
        m.w_q.data.copy_(init["w_q"])
        m.w_k.data.copy_(init["w_k"])

    gold_test = sf_gold.gold_pairs(q_test, k_test, scale=D ** -0.5)

    def metrics(m):
        row_ptr, col, candidates = m.predict(q_test, k_test)
        return sf_metrics.graph_metrics(q_test, k_test, row_ptr, col, scale=D ** -0.5, gold=gold_test,
                                predictor_ops=m.predictor_ops(q_test, k_test, candidates))

    clustering = modules["clustering"]
    for _ in range(10):
        clustering.update_centroids_(q, k)
    # untrained: the distance threshold is not calibrated yet (inf: every pair), so it is judged at the
    # threshold the trained one ends with, below
    before = {name: metrics(m) for name, m in modules.items() if name != "distance"}

    # The hinge loss does not depend on the predictor: train the projections once (Adam), then share them.
    trainer = modules["distance"].train()
    gold = sf_gold.gold_pairs(q, k, scale=D ** -0.5)
    opt = torch.optim.Adam(trainer.parameters(), lr=3e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = trainer.projection_loss(q, k, gold=gold)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the untrained distance predictor is judged at the graph size the trained one predicts: its
    # threshold is the matching quantile of its own projected distances (a test-only dense cdist)
    trained_sparsity = metrics(trainer).graph_sparsity
    untrained = SF(spec, predictor="distance", threshold=1.0)
    untrained.load_state_dict({**init, "threshold_": torch.tensor(1.0, dtype=torch.float64)})
    with torch.no_grad():
        distances = torch.cdist(*untrained.project(q_test, k_test)).flatten()
    untrained.threshold_.fill_(distances.kthvalue(int((1 - trained_sparsity) * distances.numel())).values.item())
    before["distance"] = metrics(untrained)
    for m in modules.values():
        m.w_q.data.copy_(trainer.w_q.data)
        m.w_k.data.copy_(trainer.w_k.data)
    for _ in range(20):
        clustering.update_centroids_(q, k)
    after = {name: metrics(m) for name, m in modules.items()}
    with capsys.disabled():
        print(f"\nsparsefinder acceptance (L={L}, held-out sequences): hinge loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        for name in modules:
            b, a = before[name], after[name]
            print(f"  {name:12s} recall {b.recall:.3f} -> {a.recall:.3f}   graph sparsity {b.graph_sparsity:.3f} -> "
                  f"{a.graph_sparsity:.3f}   exact {a.exact_fraction:.3f}   computation sparsity "
                  f"{a.computation_sparsity:.3f}")
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    assert any(a.recall >= 0.9 and a.graph_sparsity >= 0.5 for a in after.values()), after

    # Why clustering is the default predictor (the method's docstring): of the two that are not
    # all-pairs, it finds more gold pairs per pair kept (recall over the kept share, which a random
    # graph of that size would hold), and it keeps most of the gold graph on a quarter of the pairs.
    def lift(m):
        return m.recall / (1 - m.graph_sparsity)

    clustering, quantization = after["clustering"], after["quantization"]
    assert lift(clustering) > 1.2 * lift(quantization), (clustering, quantization)
    assert clustering.recall >= 0.65 and clustering.graph_sparsity >= 0.75, clustering
    for name in modules:  # better recall at (about) the same graph size
        assert after[name].recall > before[name].recall + 0.05, name
        assert after[name].graph_sparsity > before[name].graph_sparsity - 0.03, name


# --------------------------------------------------------------------------------------------
# 4. Through attnpass.sparsify
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert-eager", "gpt2-sdpa", "llama-eager"])
def test_sparsify_zoo_models_full_coverage_is_entmax15_of_each_site(name):
    """window >= L covers every pair: then each site computes exactly entmax15 of its own scores
    (checked per site on the inputs the rewritten graph hands it: padding, causal, GQA)."""
    case = by_name(name)
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    full = attnpass.sparsify(model, args, kwargs, method="sparsefinder", window=4096)
    assert len(full.report.sites) == case.attention_count and not full.report.skipped
    checked = []

    def check(module, inputs, kw, out):
        q, k, v = (t.double() for t in inputs[:3])
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        allowed = structure(module, B, Hq, Lq, Lk, kw.get("key_keep"))
        if kw.get("mask") is not None:
            allowed = allowed & kw["mask"]
        bias = kw.get("bias")
        expected, _ = dense_entmax(q, k, v, allowed, module.scale(q), None if bias is None else bias.double())
        checked.append(rel(out.double(), expected))

    hooks = [m.register_forward_hook(check, with_kwargs=True) for m in full.modules()
             if isinstance(m, SparsefinderAttention)]
    args, kwargs = case.inputs(3, 13)
    with torch.no_grad():
        full(*args, **kwargs)
    for h in hooks:
        h.remove()
    assert len(checked) == case.attention_count and max(checked) < 1e-5, checked


def _tiny_lm():
    return tiny_gpt2()

def _lm_batch(batch=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (batch, 8), generator=g).repeat(1, length // 8)


def _lm_loss(model, ids):
    logits = model(input_ids=ids)[0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))


def _train(sparse, ids, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(sparse.parameters(), lr=3e-3)
    sites = [m for m in sparse.modules() if isinstance(m, SparsefinderAttention)]
    losses, aux, reached = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        task = _lm_loss(sparse, ids)
        extra = attnpass.aux_loss(sparse)
        (task + extra).backward()
        reached.append((sparse.transformer.h[0].attn.c_attn.weight.grad.abs().max().item(),
                        [(s.aux_loss().item(), min(s.w_q.grad.abs().max().item(), s.w_k.grad.abs().max().item()))
                         for s in sites]))
        opt.step()
        losses.append(task.item())
        aux.append(extra.item())
    return losses, aux, reached


def test_sparsify_trains_round_trips_and_is_deterministic():
    """GPT-2 LM (causal, 2 sites) with the clustering predictor (parameters and centroid buffers).

    Early on the model's attention is near uniform, so entmax keeps every key, no key is a
    negative and the hinge loss is 0; once attention sharpens the loss is positive and its
    gradients reach W_Q, W_K (never the model: q, k are detached in it).
    """
    model = _tiny_lm()
    before = snapshot(model)
    ids = _lm_batch()
    torch.manual_seed(0)
    sparse = attnpass.sparsify(model, kwargs={"input_ids": ids}, method="sparsefinder", predictor="clustering",
                               clusters=4).train()
    initial = copy.deepcopy(sparse.state_dict())
    losses, aux, reached = _train(sparse, ids, 20, seed=1)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(model_grad > 0 for model_grad, _ in reached)
    per_site = [site for _, sites in reached for site in sites]
    assert all(w > 0 for a, w in per_site if a > 0) and all(w == 0 for a, w in per_site if a == 0)
    assert all(max(sites[i][0] for _, sites in reached) > 0 for i in range(2))  # every site learnt
    assert same_state(model, before) and not model.training
    trained = copy.deepcopy(sparse.state_dict())
    new_keys = set(trained) - set(before)
    assert {k.rsplit(".", 1)[1] for k in new_keys} == {"w_q", "w_k", "centroids", "ema_sum", "ema_count", "initialized"}
    assert all(".attnpass." in k for k in new_keys)

    other = _lm_batch(2, 24, seed=5)
    sparse.eval()
    with torch.no_grad():
        expected = sparse(input_ids=other)[0]
    fresh = attnpass.sparsify(_tiny_lm(), kwargs={"input_ids": ids}, method="sparsefinder", predictor="clustering",
                              clusters=4)
    fresh.load_state_dict(trained)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=other)[0], expected)  # state_dict round trip
    # determinism: the same start state and seed give the same training run, bit for bit
    fresh.load_state_dict(initial)
    fresh.train()
    again, again_aux, _ = _train(fresh, ids, 8, seed=1)
    assert again == losses[:8] and again_aux == aux[:8]


def test_training_calls_leave_a_hinge_loss_and_calibrate_the_distance_threshold():
    module = make_site(heads_q=2, heads_kv=2, predictor="distance", len_q=32).train()
    assert module.threshold == math.inf and module.aux_loss() is None
    q, k, v = make_inputs(2, 2, 2, 32, 32, 8, seed=6)
    module.eval()(q, k, v)
    assert module.aux_loss() is None and module.threshold == math.inf  # eval: no training state
    module.train()(q, k, v)
    loss = module.aux_loss()
    assert loss.item() > 0 and math.isfinite(module.threshold)
    w_q, w_k = torch.autograd.grad(loss, (module.w_q, module.w_k))
    assert w_q.abs().max() > 0 and w_k.abs().max() > 0
    # first calibration: the 0.95-quantile of the gold pairs' projected distances
    qp, kp = module.project(q.detach(), k.detach())
    row, col = sf_gold.gold_pairs(q.detach(), k.detach(), scale=8 ** -0.5)
    d = (qp.reshape(-1, 4)[row] - kp.reshape(-1, 4)[(row // 32) * 32 + col]).norm(dim=-1)
    assert module.threshold == pytest.approx(d.float().kthvalue(int(0.95 * (d.numel() - 1)) + 1).values.item(), rel=1e-5)


@pytest.mark.parametrize("options, error, words", [
    (dict(predictor="lsh"), ValueError, "predictor='lsh'"),
    (dict(rank=0), ValueError, "rank=0"),
    (dict(rank=2.0), TypeError, "rank=2.0"),
    (dict(bucket_size=0), ValueError, "bucket_size=0"),
    (dict(threshold=-1.0), ValueError, "threshold=-1.0"),
    (dict(threshold=float("nan")), ValueError, "threshold=nan"),
    (dict(threshold="1"), TypeError, "threshold='1'"),
    (dict(clusters=2, top_clusters=3), ValueError, "top_clusters=3"),
    (dict(window=-1), ValueError, "window=-1"),
    (dict(first_token=1), TypeError, "first_token=1"),
    (dict(margin=float("inf")), ValueError, "margin=inf"),
    (dict(decay=1.0), ValueError, "decay=1.0"),
    (dict(block=4), ValueError, "block"),
])
def test_bad_options_are_refused_before_capture(options, error, words, monkeypatch):
    def no_capture(*a, **k):
        raise AssertionError("captured before validating options")

    monkeypatch.setattr(attnpass.api, "capture_and_rewrite", no_capture)
    case = by_name("bert-eager")
    args, kwargs = case.inputs(2, 8)
    with pytest.raises(error, match=words.replace("(", r"\(")):
        attnpass.sparsify(case.build(), args, kwargs, method="sparsefinder", **options)
    with pytest.raises(error, match="sparsefinder"):
        SF.validate_options(**options)


def test_unknown_heads_are_declined_with_a_reason():
    spec = SiteSpec(name="s", scale=None, head_dim=8)
    assert "head" in SF.unsupported_reason(spec)
    with pytest.raises(ValueError, match="'s'"):
        SF(spec)


@pytest.mark.parametrize("predictor", ["quantization", "clustering"])
def test_no_square_tensor_on_the_sparse_forward_and_backward(predictor):
    L = 1024
    torch.manual_seed(0)
    module = make_site(heads_q=2, heads_kv=1, head_dim=16, len_q=L, causal=True, predictor=predictor,
                       clusters=16).float().eval()
    q, k, v = (t.float().detach().requires_grad_() for t in make_inputs(1, 2, 1, L, L, 16, seed=1, grad=False))
    keep = padding(1, L, [900])
    module.predict(q, k, keep)  # clustering: centroids from this batch
    with no_square_tensor(L, L):
        out = module(q, k, v, key_keep=keep, dropout_p=0.1)
        out.sum().backward()
    assert torch.isfinite(q.grad).all() and module.w_q.grad is None


def test_training_forward_memory_is_bounded_by_row_chunks():
    """The training call (gold graph, hinge loss) works on chunks of 2**20 / Lk rows: at L=2048 its
    largest tensor is a quarter of Lq x Lk."""
    L = 2048
    torch.manual_seed(0)
    module = make_site(heads_q=1, heads_kv=1, head_dim=8, len_q=L, causal=True, predictor="quantization").float().train()
    q, k, v = (t.float() for t in make_inputs(1, 1, 1, L, L, 8, seed=1, grad=False))
    with no_square_tensor(L, L) as probe:
        module(q, k, v)
        module.aux_loss().backward()
    assert probe.numel <= L * L // 4


# --------------------------------------------------------------------------------------------
# 5. Metrics
# --------------------------------------------------------------------------------------------


def test_metrics_equal_a_brute_force_count():
    B, Hq, Hkv, L, D = 2, 2, 1, 24, 8
    torch.manual_seed(0)
    module = make_site(heads_q=Hq, heads_kv=Hkv, head_dim=D, len_q=L, causal=True, predictor="quantization",
                       bucket_size=3, window=None, first_token=False).eval()
    q, k, _ = make_inputs(B, Hq, Hkv, L, L, D, seed=4, grad=False)
    keep = padding(B, L, [24, 18])
    row_ptr, col, candidates = module.predict(q, k, keep)
    ops = module.predictor_ops(q, k, candidates)
    got = sf_metrics.graph_metrics(q, k, row_ptr, col, scale=D ** -0.5, causal=True, key_keep=keep, predictor_ops=ops)

    allowed = _dense_allowed(B, Hq, L, L, True, 0, keep)
    _, probs = dense_entmax(q, k, k, allowed, D ** -0.5)
    gold = probs > 0
    pred = edges_to_dense_mask(row_ptr, col, B, Hq, L, L) & allowed
    hit = pred & gold
    assert got.gold == int(gold.sum()) and got.predicted == int(pred.sum()) and got.hit == int(hit.sum())
    assert got.valid == int(allowed.sum())
    assert got.recall == pytest.approx(hit.sum().item() / gold.sum().item())
    assert got.graph_sparsity == pytest.approx(1 - pred.sum().item() / allowed.sum().item())
    rows = gold.any(-1)
    exact = (hit.sum(-1) == gold.sum(-1)) & rows
    assert got.exact_fraction == pytest.approx(exact.sum().item() / rows.sum().item())
    assert 0 < got.recall < 1 and 0 < got.exact_fraction < 1
    pair = 4 * D + 5
    per_head = (2 * D * 4 * (L + L) + 4 * (L * math.log2(L) * 2) + 4 * L * 3
                + (candidates // (B * Hq)) * math.log2(candidates // (B * Hq)))
    assert float(cost_model.PAIR.subs(cost_model.D, D)) == pair
    dense_ops = B * Hq * L * L * pair
    assert got.computation_sparsity == pytest.approx(1 - (B * Hq * per_head + pred.sum().item() * pair) / dense_ops)


def test_model_level_metrics_pool_the_sites():
    case = by_name("gpt2-sdpa")
    model = case.build()
    args, kwargs = case.inputs(2, 8)
    torch.manual_seed(0)
    sparse = attnpass.sparsify(model, args, kwargs, method="sparsefinder", predictor="clustering", clusters=3)
    args, kwargs = case.inputs(2, 24)
    result = sparsefinder_metrics(sparse, args, kwargs)
    sites = [name for name in result if name != "overall"]
    assert len(sites) == case.attention_count
    for field in ("gold", "predicted", "hit", "valid", "queries", "exact_queries"):
        assert result["overall"][field] == sum(result[s][field] for s in sites)
    overall = result["overall"]
    assert overall["recall"] == pytest.approx(overall["hit"] / overall["gold"])
    assert 0 < overall["recall"] <= 1 and 0 <= overall["graph_sparsity"] < 1
    assert all(m.aux_loss() is None for m in sparse.modules() if isinstance(m, SparsefinderAttention))
    with pytest.raises(ValueError, match="no method='sparsefinder'"):
        sparsefinder_metrics(model, args, kwargs)


def test_one_cluster_without_top_clusters_uses_a_valid_default():
    """The default top_clusters (2) is capped at the cluster count, in validation and in the module."""
    SF.validate_options(clusters=1)
    module = SF(SiteSpec(name="s", scale=None, heads_q=2, heads_kv=2, head_dim=8), clusters=1).eval()
    assert module.top_clusters == 1
    q = torch.randn(1, 2, 10, 8)
    assert torch.isfinite(module(q, q, q)).all()


# ------------------------------------------------------------------------------------------------
# memory: a call whose predicted pairs would not fit is refused before they are allocated


def _memory_site(predictor: str, **options):
    spec = SiteSpec(name="mem", scale=None, heads_q=4, heads_kv=4, head_dim=16)
    site = SparsefinderAttention(spec, predictor=predictor, **options).eval()
    if predictor == "distance":
        site.threshold_.fill_(4.0)
    return site


@pytest.mark.parametrize("predictor", ["clustering", "distance"])
def test_a_call_over_the_memory_limit_is_refused_before_its_pairs_exist(predictor, monkeypatch):
    from attnpass.memory_guard import AttentionTooLarge
    from attnpass.methods import sparsefinder as sf

    q = torch.randn(1, 4, 256, 16, generator=torch.Generator().manual_seed(0))
    site = _memory_site(predictor)
    row_ptr, col, candidates = site.predict(q, q)  # what the call would predict (also starts the centroids)
    window_pairs = int((predictors.window_slots(1, 4, 256, 256, site.window, site.first_token) >= 0).sum())
    site.memory_limit = (candidates - window_pairs) * sf.BYTES_PER_PAIR - 1
    made = []
    monkeypatch.setattr(predictors, "edges_from_pairs", lambda *a, **k: made.append(1))  # the merge of all pairs
    with pytest.raises(AttentionTooLarge, match=r"sparsefinder site 'mem': this call needs about .* predicted pairs"
                                                r".*more than the limit given .* refused before allocating"):
        site(q, q, q)
    assert not made
    monkeypatch.undo()
    site.memory_limit = (candidates - window_pairs) * sf.BYTES_PER_PAIR  # exactly enough: runs
    site(q, q, q)


def test_the_quantization_predictor_has_fixed_pairs_and_is_not_checked(monkeypatch):
    import attnpass.memory_guard as guard

    monkeypatch.setattr(guard, "available_bytes", lambda: 1)
    q = torch.randn(1, 4, 64, 16)
    _memory_site("quantization")(q, q, q)  # runs: its pairs per query are fixed by bucket_size
    with pytest.raises(guard.AttentionTooLarge, match="more than the memory this machine has available"):
        _memory_site("clustering")(q, q, q)


@pytest.mark.parametrize("value,error", [(0, ValueError), (2.5, TypeError)])
def test_memory_limit_must_be_a_positive_int(value, error):
    with pytest.raises(error, match="memory_limit"):
        _memory_site("clustering", memory_limit=value)
