"""method="sbm": sampling law, fallback edges, straight-through gradients, exactness on the sampled
graph, density regulariser, determinism, memory, and the method through `attnpass.sparsify`.

Dense references (P = Y_Q B Y_K^T, masks over all pairs) are built here on purpose, at small L.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import attnpass
import attnpass.methods.sbm as sbm_module
from attnpass.lowering.torch.edge_attention import edges_from_pairs, edges_to_dense_mask
from attnpass.methods.base import SiteSpec
from attnpass.methods.sbm import SBMAttention
from attnpass.methods.sbm.sampling import (
    SBMGraph, fallback_keys, block_matrix, expected_density, sample_edge_pairs, sample_graph,
)
from memory_probe import no_square_tensor
from tests.helpers import tiny_gpt2, max_relative_error, same_state, snapshot
from tests.zoo import by_name

F64 = torch.float64


def spec(heads_q=2, heads_kv=2, head_dim=8, causal=False, bottom_right=False, L=16):
    return SiteSpec(name="site", scale=None, causal=causal, causal_bottom_right=bottom_right, heads_q=heads_q,
                    heads_kv=heads_kv, head_dim=head_dim, example_len_q=L, example_len_k=L)


def dense_p(y_q, y_k, block):
    return y_q @ block @ y_k.transpose(-1, -2)


def allowed_pairs(site, N, Lq, Lk, key_keep):
    """(N, Lq, Lk) bool: the pairs the site's causal rule (top-left) and padding allow."""
    allowed = torch.ones(N, Lq, Lk, dtype=torch.bool)
    if site.spec.causal:
        allowed &= torch.ones(Lq, Lk, dtype=torch.bool).tril()
    if key_keep is not None:
        allowed &= key_keep.repeat_interleave(N // key_keep.shape[0], dim=0).unsqueeze(1)
    return allowed


def dense_drawn_p(site, y_q, y_k, block, key_keep):
    """P as the site draws its graph from it: each head's P scaled down to `max_density` of its allowed
    pairs where it holds more (the factor is a constant, no gradient), and the factors."""
    P = dense_p(y_q, y_k, block)
    allowed = allowed_pairs(site, P.shape[0], P.shape[1], P.shape[2], key_keep)
    density = (P * allowed).sum((1, 2)) / allowed.sum((1, 2))
    factor = (site.max_density / density).clamp(max=1.0).detach()
    return P * factor.view(-1, 1, 1), factor


def random_memberships(N, Lq, Lk, k, gen):
    y_q = torch.rand(N, Lq, k, generator=gen, dtype=F64) * 0.9 + 0.05
    y_k = torch.rand(N, Lk, k, generator=gen, dtype=F64) * 0.9 + 0.05
    block = block_matrix(torch.randn(N, k, 3, generator=gen, dtype=F64))
    return y_q, y_k, block


# --------------------------------------------------------------------------------------------
# 1. Sampling law: counts are Poisson(P), edges appear with probability 1 - exp(-P)
# --------------------------------------------------------------------------------------------


def test_block_matrix_is_a_softmax_over_all_k_squared_entries():
    C = torch.randn(3, 4, 5, dtype=F64)
    block = block_matrix(C)
    assert torch.allclose(block.sum((1, 2)), torch.ones(3, dtype=F64))
    logits = C @ C.transpose(-1, -2)
    assert torch.allclose(block[1], torch.exp(logits[1]) / torch.exp(logits[1]).sum())


def test_sampled_edge_frequencies_match_p():
    """R independent draws of the same heads (they are the batch): the mean multiplicity of each
    pair estimates P_ij (+ floor) and the frequency of the merged edge estimates 1 - exp(-P_ij),
    each within 5 standard errors."""
    gen = torch.Generator().manual_seed(0)
    Lq, Lk, k, R = 5, 6, 3, 6000
    y_q, y_k, block = random_memberships(1, Lq, Lk, k, gen)
    keep = torch.tensor([[True, True, False, True, True, True]])
    y_k = y_k * keep.unsqueeze(-1)
    floor = 0.05
    P = dense_p(y_q, y_k, block)[0] + floor * keep.to(F64)  # (Lq, Lk); padding key: never
    assert P.max() < 1

    row, col = sample_edge_pairs(y_q.expand(R, -1, -1), y_k.expand(R, -1, -1), block.expand(R, -1, -1),
                                 torch.Generator().manual_seed(1), floor=floor, key_keep=keep.expand(R, -1))
    counts = torch.zeros(R * Lq, Lk, dtype=F64).index_put_((row, col), torch.ones(row.numel(), dtype=F64),
                                                           accumulate=True).view(R, Lq, Lk)
    mean = counts.mean(0)
    assert torch.all((mean - P).abs() <= 5 * torch.sqrt(P / R) + 1e-12), (mean - P).abs().max()
    freq = (counts > 0).to(F64).mean(0)
    p_edge = 1 - torch.exp(-P)
    assert torch.all((freq - p_edge).abs() <= 5 * torch.sqrt(p_edge * (1 - p_edge) / R) + 1e-12)
    assert torch.all(counts[:, :, 2] == 0)  # the padding key is never drawn


def test_causal_graph_law_fallback_edges_and_csr():
    """sample_graph: allowed pairs keep the 1 - exp(-P) law, forbidden ones never appear, and
    a row that drew nothing gets exactly its fallback key, flagged as not sampled."""
    gen = torch.Generator().manual_seed(2)
    Lq, Lk, k, R = 6, 6, 3, 4000
    y_q, y_k, block = random_memberships(1, Lq, Lk, k, gen)
    y_q = y_q * 0.3  # sparse enough that some rows draw nothing
    graph = sample_graph(y_q.expand(R, -1, -1), y_k.expand(R, -1, -1), block.expand(R, -1, -1),
                         torch.Generator().manual_seed(3), heads=R, causal=True, causal_offset=0, key_keep=None)
    mask = edges_to_dense_mask(graph.row_ptr, graph.col_index, 1, R, Lq, Lk)[0]          # (R, Lq, Lk)
    sampled = torch.zeros(R * Lq, Lk, dtype=torch.bool)
    sampled[graph.edge_row, graph.col_index] = graph.sampled
    sampled = sampled.view(R, Lq, Lk)
    allowed = torch.ones(Lq, Lk).tril().bool()
    assert not (mask & ~allowed).any()
    P = dense_p(y_q, y_k, block)[0]
    p_edge = 1 - torch.exp(-P)
    freq = sampled.to(F64).mean(0)
    assert torch.all(((freq - p_edge).abs() <= 5 * torch.sqrt(p_edge * (1 - p_edge) / R) + 1e-12)[allowed])
    # fallback: rows without sampled edges hold exactly the diagonal key, unsampled
    empty = ~sampled.any(-1)
    assert empty.any()
    assert torch.all(mask.sum(-1) >= 1)
    diag = torch.eye(Lq, dtype=torch.bool).expand(R, -1, -1)
    assert torch.equal(mask[empty], diag[empty])
    assert torch.equal(mask & ~sampled, diag & empty.unsqueeze(-1))


@pytest.mark.parametrize("causal, offset, Lq, Lk", [(False, 0, 5, 9), (True, 0, 7, 7), (True, 2, 5, 7),
                                                     (True, -2, 7, 5)])
def test_fallback_key_rule(causal, offset, Lq, Lk):
    keep = torch.tensor([[True] * Lk, [False, True] + [True] * (Lk - 4) + [False, False],
                         [False] * Lk])
    fallback = fallback_keys(Lq, Lk, causal, offset, keep)
    for b in range(3):
        for i in range(Lq):
            anchor = min(i + offset, Lk - 1) if causal else i * Lk // Lq
            real = [j for j in range(Lk) if keep[b, j]]
            before = [j for j in real if 0 <= anchor and j <= anchor]
            after = [j for j in real if j > anchor] if not causal else []
            want = before[-1] if before else (after[0] if after else -1)
            if anchor < 0:
                want = -1
            assert int(fallback[b, i]) == want, (b, i)


# --------------------------------------------------------------------------------------------
# 2. The site module: exactness on its own graph, STE gradients, density
# --------------------------------------------------------------------------------------------


def dense_on_graph(q, k, v, graph: SBMGraph, scale, causal=False, offset=0, key_keep=None, bias=None, weights=None):
    """Softmax of the site's scores over exactly the graph's (allowed) edges, densely.

    `weights` (N, Lq, Lk): the adjacency as a float tensor (1 on edges), multiplied into the
    unnormalised probabilities, so its gradient is dL/dA."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = edges_to_dense_mask(graph.row_ptr, graph.col_index, B, Hq, Lq, Lk)
    if causal:
        mask = mask & (torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1) + offset)
    if key_keep is not None:
        mask = mask & key_keep.view(B, 1, 1, Lk)
    scores = scale * q @ k.transpose(-1, -2) + (0 if bias is None else bias)
    m = scores.masked_fill(~mask, -math.inf).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(scores - m) * mask
    if weights is not None:
        e = e * weights.view(B, Hq, Lq, Lk)
    z = e.sum(-1, keepdim=True)
    return torch.where(z > 0, e / z.clamp(min=1e-300), 0.0) @ v


CASES = {
    # name: heads_q, heads_kv, Lq, Lk, causal, bottom_right, padding, bias, mask
    "plain": (2, 2, 12, 12, False, False, False, False, False),
    "causal_gqa_padding": (4, 2, 12, 12, True, False, True, False, False),
    "cross_bias": (2, 1, 9, 14, False, False, True, True, False),
    "bottom_right_mask": (2, 2, 8, 11, True, True, False, False, True),
}


def make_site(case, clusters=4, seed=0):
    Hq, Hkv, Lq, Lk, causal, br, padding, has_bias, has_mask = CASES[case]
    torch.manual_seed(seed)
    site = SBMAttention(spec(Hq, Hkv, 6, causal, br, Lq), clusters=clusters).double()
    site.prefill_queries = 1  # every call runs the method, also a short chunk over cached keys
    site.keep_graph = True
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(2, Hq, Lq, 6, generator=gen, dtype=F64, requires_grad=True)
    k = torch.randn(2, Hkv, Lk, 6, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(2, Hkv, Lk, 5, generator=gen, dtype=F64, requires_grad=True)
    keep = None
    if padding:
        keep = torch.ones(2, Lk, dtype=torch.bool)
        keep[1, -3:] = False
    bias = torch.randn(1, Hq, Lq, Lk, generator=gen, dtype=F64) if has_bias else None
    mask = (torch.rand(2, 1, Lq, Lk, generator=gen) > 0.2) if has_mask else None
    return site, (q, k, v), dict(bias=bias, mask=mask, key_keep=keep)


def dense_on_last_graph(site, q, k, v, kw):
    """`dense_on_graph` on the site's last graph, with the site's scale, causal rule and masks."""
    offset = (k.shape[2] - q.shape[2]) if site.spec.causal_bottom_right else 0
    bias = kw["bias"]
    if kw["mask"] is not None:
        bias = torch.zeros(kw["mask"].shape, dtype=F64).masked_fill(~kw["mask"], -math.inf)
    return dense_on_graph(q, k, v, site.last_graph, q.shape[-1] ** -0.5, site.spec.causal, offset, kw["key_keep"],
                          bias)


@pytest.mark.parametrize("case", list(CASES))
def test_output_equals_dense_attention_on_the_sampled_graph(case):
    site, (q, k, v), kw = make_site(case)
    site.eval()
    out = site(q, k, v, **kw)
    graph = site.last_graph
    ref = dense_on_last_graph(site, q, k, v, kw)
    assert max_relative_error(out, ref) <= 1e-10
    g = torch.randn(out.shape, dtype=F64)
    got = torch.autograd.grad((out * g).sum(), (v,))
    want = torch.autograd.grad((ref * g).sum(), (v,))
    assert max_relative_error(got, want) <= 1e-10
    # every query with a visible real key has at least one edge
    assert (graph.row_ptr.diff() > 0).sum() > 0
    if kw["key_keep"] is None and not site.spec.causal_bottom_right:
        assert torch.all(graph.row_ptr.diff() > 0)


@pytest.mark.parametrize("case", ["plain", "causal_gqa_padding"])
def test_straight_through_gradient_equals_the_hand_derived_formula(case):
    """dL/dP = hardtanh(A * dL/dA) on sampled edges (0 elsewhere), back-propagated through
    P = Y_Q B Y_K^T to the clusters, phi and q, k: computed here densely, from the same graph."""
    site, (q, k, v), kw = make_site(case)
    site.eval()  # the fixed-seed graph; the STE is active whenever gradients are
    g_out = torch.randn(q.shape[:3] + (5,), dtype=F64, generator=torch.Generator().manual_seed(9))
    out = site(q, k, v, key_keep=kw["key_keep"])
    graph = site.last_graph
    params = [site.clusters, *site.phi.parameters(), q, k, v]
    got = torch.autograd.grad((out * g_out).sum(), params)

    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    N = B * Hq
    adjacency = torch.zeros(N * Lq, Lk, dtype=F64)
    adjacency[graph.edge_row, graph.col_index] = 1.0
    sampled = torch.zeros(N * Lq, Lk, dtype=F64)
    sampled[graph.edge_row, graph.col_index] = graph.sampled.to(F64)
    A = adjacency.view(N, Lq, Lk).clone().requires_grad_()
    offset = 0
    ref = dense_on_graph(q, k, v, graph, q.shape[-1] ** -0.5, site.spec.causal, offset, kw["key_keep"], weights=A)
    assert max_relative_error(ref, out) <= 1e-10
    loss = (ref * g_out).sum()
    d_A, = torch.autograd.grad(loss, A, retain_graph=True)
    d_P = torch.clamp(sampled.view(N, Lq, Lk) * d_A, -1, 1)
    y_q, y_k, block = site.memberships(q, k, kw["key_keep"])
    P, factor = dense_drawn_p(site, y_q, y_k, block, kw["key_keep"])
    assert (factor < 1).any()  # the density cap is active for some head: its gradient is the scaled P's
    want_attention = torch.autograd.grad(loss, params, allow_unused=True)
    want_ste = torch.autograd.grad(P, params, grad_outputs=d_P, allow_unused=True)
    for name, a, b1, b2 in zip(["clusters", "phi0.w", "phi0.b", "phi2.w", "phi2.b", "q", "k", "v"],
                               got, want_attention, want_ste):
        want = sum(t for t in (b1, b2) if t is not None)
        assert max_relative_error(a, want) <= 1e-9, name
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0  # the cluster parameters do learn


@pytest.mark.parametrize("causal, offset, padding", [(False, 0, False), (False, 0, True), (True, 0, True),
                                                     (True, -3, False)])
def test_expected_density_matches_dense_p(causal, offset, padding):
    gen = torch.Generator().manual_seed(4)
    B, H, Lq, Lk, k = 2, 2, 7, 9, 3
    y_q, y_k, block = random_memberships(B * H, Lq, Lk, k, gen)
    keep = None
    allowed = torch.ones(B * H, Lq, Lk, dtype=torch.bool)
    if padding:
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[1, :3] = False
        y_k = y_k * keep.repeat_interleave(H, 0).unsqueeze(-1)
        allowed = allowed & keep.repeat_interleave(H, 0).unsqueeze(1)
    if causal:
        allowed = allowed & (torch.arange(Lk).view(1, -1) <= torch.arange(Lq).view(-1, 1) + offset)
    P = dense_p(y_q, y_k, block)
    want = ((P * allowed).sum((1, 2)) / allowed.sum((1, 2)).clamp(min=1)).mean()
    got = expected_density(y_q, y_k, block, causal=causal, causal_offset=offset, key_keep=keep, heads=H)
    assert abs(got.item() - want.item()) <= 1e-12


def test_density_regulariser_is_the_aux_loss_and_has_gradient():
    site, (q, k, v), kw = make_site("causal_gqa_padding")
    site.train()
    assert site.aux_loss() is None
    site(q, k, v, key_keep=kw["key_keep"])
    loss = site.aux_loss()
    y_q, y_k, block = site.memberships(q, k, kw["key_keep"])
    density = expected_density(y_q, y_k, block, causal=True, causal_offset=0, key_keep=kw["key_keep"], heads=4)
    assert torch.allclose(loss, 1e-4 * density)
    grad, = torch.autograd.grad(loss, site.clusters)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# 3. Determinism, options, memory
# --------------------------------------------------------------------------------------------


def test_same_seed_same_graph_and_eval_is_deterministic():
    site, (q, k, v), kw = make_site("causal_gqa_padding")
    site.eval()
    a = site(q, k, v, key_keep=kw["key_keep"])
    edges_a = site.last_graph.col_index.clone()
    b = site(q, k, v, key_keep=kw["key_keep"])
    assert torch.equal(a, b) and torch.equal(edges_a, site.last_graph.col_index)
    other = copy.deepcopy(site)
    other.seed = 1
    other(q, k, v, key_keep=kw["key_keep"])
    assert not torch.equal(edges_a, other.last_graph.col_index)
    # train mode: a fresh graph per call, reproduced by torch.manual_seed
    site.train()
    graphs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        site(q, k, v, key_keep=kw["key_keep"])
        graphs.append(site.last_graph.col_index.clone())
    assert torch.equal(graphs[0], graphs[1]) and not torch.equal(graphs[0], graphs[2])


@pytest.mark.parametrize("options, error, match", [
    (dict(clusters=0), ValueError, "clusters=0 must be an int >= 1"),
    (dict(clusters=2.5), TypeError, "clusters=2.5 must be an int"),
    (dict(density_weight=-1.0), ValueError, "density_weight=-1.0 must be in"),
    (dict(floor=1.5), ValueError, r"floor=1.5 must be in \[0.0, 1.0\)"),
    (dict(seed=-1), ValueError, "seed=-1"),
    (dict(window=3), ValueError, r"unknown option\(s\) \['window'\]"),
])
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        SBMAttention.validate_options(**options)


def test_no_quadratic_tensor_forward_and_backward():
    """At about 1% density (memberships ~0.1) and L=1024, nothing reaches Lq*Lk elements."""
    L, D = 1024, 16
    torch.manual_seed(0)
    site = SBMAttention(spec(2, 2, D, causal=True, L=L), clusters=8)
    site.keep_graph = True
    with torch.no_grad():
        site.phi[2].weight.zero_()
        site.phi[2].bias.fill_(1.0)
        site.clusters.fill_(-2.2 / D)  # phi(x) . c = -2.2: memberships 0.1, P = 0.01
    site.train()
    q, k, v = (torch.randn(1, 2, L, D, requires_grad=True) for _ in range(3))
    with no_square_tensor(L, L):
        out = site(q, k, v)
        (out.sum() + site.aux_loss()).backward()
    assert 0.005 < site.last_graph.nnz / (2 * L * L / 2) < 0.05
    assert site.clusters.grad is not None and site.phi[0].weight.grad is not None


# --------------------------------------------------------------------------------------------
# 4. Through attnpass.sparsify
# --------------------------------------------------------------------------------------------


def _complete_graph(y_q, y_k, block, generator, *, heads, causal, causal_offset, key_keep, floor=0.0):
    """Every pair an edge (a test hook): the sparse model must then equal the original."""
    N, Lq, _ = y_q.shape
    Lk = y_k.shape[1]
    row = torch.arange(N * Lq).repeat_interleave(Lk)
    col = torch.arange(Lk).repeat(N * Lq)
    row_ptr, col_index = edges_from_pairs(row, col, N * Lq)
    return SBMGraph(row_ptr, col_index, row, sampled=torch.ones(row.numel(), dtype=torch.bool))


@pytest.mark.parametrize("name", ["bert-eager", "gpt2-sdpa", "llama-eager", "hand-cross-attention"])
def test_with_the_complete_graph_the_rewritten_model_equals_the_original(name, monkeypatch):
    """The exactness anchor: it checks how the site reads scale, causal rule, padding, GQA and
    bias, independently of the sampling."""
    monkeypatch.setattr(sbm_module, "sample_graph", _complete_graph)
    case = by_name(name)
    model = case.build().eval()
    args, kwargs = case.inputs(2, 12)
    sparse = attnpass.sparsify(model, args, kwargs, method="sbm", clusters=4)
    assert len(sparse.sites) == case.attention_count
    with torch.no_grad():
        assert max_relative_error(sparse(*args, **kwargs), model(*args, **kwargs)) <= 1e-5


def _tiny_gpt2():
    return tiny_gpt2(vocab_size=64, n_head=2)

def test_sparsify_trains_reaches_all_parameters_and_round_trips_state():
    model = _tiny_gpt2()
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 32), generator=gen)
    sparse = attnpass.sparsify(model, (ids,), method="sbm", clusters=8)
    assert same_state(model, before)  # the input model is untouched
    assert any(".attnpass.clusters" in n for n, _ in sparse.named_parameters())
    sparse.train()
    optimiser = torch.optim.Adam(sparse.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(1)
    for step in range(30):
        # a learnable pattern: the next token is the current one + 1
        x = (torch.arange(32) + torch.randint(0, 64, (4, 1), generator=gen)) % 64
        logits = sparse(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
        optimiser.zero_grad()
        (loss + attnpass.aux_loss(sparse)).backward()
        if step == 0:
            grads = {n: p.grad for n, p in sparse.named_parameters()}
            assert grads["transformer.h.0.attn.c_attn.weight"].abs().sum() > 0
            assert grads["transformer.h.0.attn.attnpass.clusters"].abs().sum() > 0
            assert grads["transformer.h.1.attn.attnpass.phi.0.weight"].abs().sum() > 0
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses

    sparse.eval()
    reloaded = attnpass.sparsify(_tiny_gpt2(), (ids,), method="sbm", clusters=8)
    reloaded.load_state_dict(sparse.state_dict())
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(sparse(ids).logits, reloaded(ids).logits)


def test_bad_options_are_refused_before_capture(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("captured before validating the options")

    monkeypatch.setattr(attnpass.api, "capture_and_rewrite", fail)
    case = by_name("bert-eager")
    args, kwargs = case.inputs(1, 8)
    with pytest.raises(ValueError, match="clusters=0"):
        attnpass.sparsify(case.build(), args, kwargs, method="sbm", clusters=0)


def test_graphs_are_not_kept_between_calls_unless_asked():
    """A long sequence's graph is hundreds of MB per site: by default a call does not keep it."""
    site = SBMAttention(spec(), clusters=4).eval()
    q = torch.randn(1, 2, 16, 8)
    site(q, q, q)
    assert site.last_graph is None
    site.keep_graph = True
    site(q, q, q)
    assert site.last_graph is not None and site.last_graph.nnz > 0


# ------------------------------------------------------------------------------------------------
# memory: a call that would not fit is refused before its graph is drawn


def _memory_site(**options):
    spec = SiteSpec(name="mem", scale=None, heads_q=4, heads_kv=4, head_dim=16)
    return SBMAttention(spec, clusters=8, **options).eval()


def test_a_call_over_the_memory_limit_is_refused_before_sampling(monkeypatch):
    from attnpass.memory_guard import AttentionTooLarge

    site = _memory_site(memory_limit=50_000)
    q = torch.randn(1, 4, 256, 16)

    def never(*args, **kwargs):
        raise AssertionError("the graph was drawn although the call does not fit")

    monkeypatch.setattr(sbm_module, "sample_graph", never)
    with pytest.raises(AttentionTooLarge, match=r"sbm site 'mem': this call needs about .* sampled edges.*"
                                                r"more than the limit given .* refused before allocating"):
        site(q, q, q)


def test_the_estimate_is_the_draws_size_and_a_call_within_the_limit_runs():
    from attnpass.methods.sbm.sampling import expected_edge_count

    site = _memory_site()
    site.keep_graph = True
    q = torch.randn(2, 4, 256, 16)
    with torch.no_grad():
        y_q, y_k, block = site.memberships(q, q, None)
    expected = expected_edge_count(y_q, y_k, block)
    site.memory_limit = int(expected * sbm_module.BYTES_PER_EDGE * 1.5)
    row, _ = sample_edge_pairs(y_q, y_k, block, torch.Generator().manual_seed(0))
    assert abs(row.numel() - expected) < 5 * math.sqrt(expected)  # a Poisson total: its mean is the estimate
    assert site.last_graph is None
    site(q, q, q)  # runs: the estimate is within the limit
    assert site.last_graph is not None and site.last_graph.nnz <= row.numel() + 2 * 4 * 256


def test_without_a_limit_the_machines_available_memory_is_the_limit(monkeypatch):
    import attnpass.memory_guard as guard

    site = _memory_site()
    q = torch.randn(1, 4, 128, 16)
    monkeypatch.setattr(guard, "available_bytes", lambda: 10_000)
    with pytest.raises(guard.AttentionTooLarge, match="more than the memory this machine has available"):
        site(q, q, q)
    monkeypatch.setattr(guard, "available_bytes", lambda: None)  # unknown (not Linux): not checked
    site(q, q, q)


@pytest.mark.parametrize("value,error", [(0, ValueError), ("8GB", TypeError), (True, TypeError)])
def test_memory_limit_must_be_a_positive_int(value, error):
    with pytest.raises(error, match="memory_limit"):
        _memory_site(memory_limit=value)


# --------------------------------------------------------------------------------------------
# The density cap: a call draws at most max_density of each head's allowed pairs (in expectation)
# --------------------------------------------------------------------------------------------


def _cap_site(max_density, causal=True):
    torch.manual_seed(0)
    site = SBMAttention(spec(4, 2, 16, causal, L=192), clusters=16, max_density=max_density).eval()
    site.keep_graph = True
    return site


def _drawn_density(site, q, k, key_keep, seeds=range(4)):
    """(heads,): the mean share of each head's allowed pairs its sampled edges cover, over draws."""
    B, Hq, Lq, _ = q.shape
    allowed = allowed_pairs(site, B * Hq, Lq, k.shape[2], key_keep).sum((1, 2))
    shares = []
    for seed in seeds:
        site.seed = seed
        with torch.no_grad():
            site(q, k, k, key_keep=key_keep)
        graph = site.last_graph
        sampled_per_head = torch.zeros(B * Hq).index_add_(0, graph.edge_row // Lq, graph.sampled.float())
        shares.append(sampled_per_head / allowed)
    return torch.stack(shares).mean(0)


@pytest.mark.parametrize("causal, padding", [(True, False), (True, True), (False, True)])
def test_a_call_draws_at_most_max_density_of_each_heads_allowed_pairs(causal, padding):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 192, 16, generator=gen)
    k = torch.randn(2, 2, 192, 16, generator=gen)
    keep = None
    if padding:
        keep = torch.ones(2, 192, dtype=torch.bool)
        keep[1, :40] = False
    free = _drawn_density(_cap_site(None, causal), q, k, keep)
    assert free.min() > 0.15  # an untrained site's P covers about a fifth of the pairs
    for cap in (0.1, 0.03):
        site = _cap_site(cap, causal)
        drawn = _drawn_density(site, q, k, keep)
        # merged duplicates make the drawn share a little lower than the expected one (1 - exp(-P) <= P)
        assert drawn.max() <= cap * 1.05 and drawn.min() >= cap * 0.85, (cap, drawn)
        with torch.no_grad():
            y_q, y_k, block = site.memberships(q, k, keep)
            want, factor = dense_drawn_p(site, y_q.double(), y_k.double(), block.double(), keep)
            got = site.capped_block(q, k, y_q, y_k, block, keep)
        assert (factor < 1).all()
        torch.testing.assert_close(got.double(), block.double() * factor.view(-1, 1, 1), rtol=1e-5, atol=0)


def test_a_cap_above_every_heads_density_changes_nothing():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 192, 16, generator=gen)
    k = torch.randn(1, 2, 192, 16, generator=gen)
    graphs = []
    for cap in (None, 0.99):
        site = _cap_site(cap)
        with torch.no_grad():
            out = site(q, k, k)
        graphs.append((out, site.last_graph.col_index))
    assert torch.equal(graphs[0][0], graphs[1][0]) and torch.equal(graphs[0][1], graphs[1][1])


def test_max_density_option_is_checked():
    with pytest.raises(ValueError, match=r"max_density=1.5 must be in"):
        SBMAttention.validate_options(max_density=1.5)
    with pytest.raises(ValueError, match=r"max_density=0"):
        SBMAttention.validate_options(max_density=0)
    SBMAttention.validate_options(max_density=None)
