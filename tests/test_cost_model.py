"""The sympy cost model: hand counts, asymptotic orders, the defaults it chooses, and sites."""
from __future__ import annotations

import math

import pytest
import sympy
import torch

import attnpass
from attnpass import cost_model
from attnpass.cost_model import D, Lk, Lq, c, s
from attnpass.methods import SiteSpec, method_class
from attnpass.methods.routing.member_keys import NEED_BLOCK
from tests.zoo import by_name

L = sympy.Symbol("L", positive=True)


def test_dense_flops_and_bytes_match_a_hand_count():
    flops, nbytes = cost_model.cost_expr("dense").evaluate(B=2, H=3, Lq=5, Lk=7, D=4)
    # per (b, h): 5*7 pairs, each 2*4 (q.k) + 2*4 (p.v) + 5 (softmax)
    assert flops == 2 * 3 * 5 * 7 * (8 + 8 + 5)
    # q, out (5x4) and k, v (7x4) in fp32, plus the 5x7 scores written and read
    assert nbytes == 2 * 3 * (4 * (2 * 5 * 4 + 2 * 7 * 4) + 4 * 2 * 5 * 7)


def test_routing_and_combiner_fixed_match_a_hand_count():
    flops, _ = cost_model.cost_expr("routing", clusters=4, local_window=3).evaluate(B=1, H=1, Lq=16, Lk=16, D=2)
    similarities = 2 * 32 * 4 * 2          # 32 tokens x 4 centroids, 2-dim dot products
    selection = 32 * 4                      # one comparison per (token, centroid)
    attention = 4 * (4 * 4) * (4 * 2 + 5)  # 4 clusters of 4 queries x 4 keys
    # ~1/e of the queries fall back; the kernel's tile gives each the 2*3 - 1 keys of its block's
    # window union (the union of 3 consecutive queries' windows of 3), not only its own 3
    fallback = 16 / math.e * (2 * 3 - 1) * (4 * 2 + 5)
    assert flops == pytest.approx(similarities + selection + attention + fallback, rel=1e-12)

    # keys='members': the 16 keys pooled into 16 / NEED_BLOCK blocks, every query's block scores
    # (score and log-sum-exp), and 3 sampled queries per cluster against every key (logit and softmax)
    members, _ = cost_model.cost_expr("routing", clusters=4, local_window=3, sampled_queries=3).evaluate(
        B=1, H=1, Lq=16, Lk=16, D=2)
    need = 16 * 2 + 16 * (16 / NEED_BLOCK) * (2 * 2 + 3)
    assert members - flops == pytest.approx(need + 4 * 3 * 16 * (2 * 2 + 5), rel=1e-12)
    # refit_steps: per Lloyd step and token (queries and keys; queries alone with keys='members'), its 4
    # similarities, the comparisons that find the nearest and its share of the sums
    for sampled, tokens in ((0, 32), (3, 16)):
        refit, _ = cost_model.cost_expr("routing", clusters=4, local_window=3, sampled_queries=sampled,
                                        refit_steps=2).evaluate(B=1, H=1, Lq=16, Lk=16, D=2)
        plain = members if sampled else flops
        assert refit - plain == pytest.approx(2 * tokens * (2 * 4 * 2 + 4 + 2), rel=1e-12)

    flops, _ = cost_model.cost_expr("combiner", variant="fixed", block=4).evaluate(B=1, H=1, Lq=16, Lk=16, D=2)
    pair = 4 * 2 + 5
    direct, summaries = 16 * 4 * pair, 16 * 4 * pair  # own block of 4 keys; 4 region summaries each
    pooling, summary_values = 32 * 2, 16 * pair        # max-pools; pooled query over each region's keys
    assert flops == direct + summaries + pooling + summary_values


@pytest.mark.parametrize("causal", [False, True])
def test_routing_pairs_match_the_kernel_tiles_of_a_real_call(causal):
    """The model counts every slot of the grouped kernel's tiles; a real call's layout
    (`RoutingAttention.layout`, the index tensors forward hands the kernel) gives the tiles."""
    B, H, L, D = 1, 4, 1024, 64
    spec = SiteSpec(name="s", scale=None, causal=causal, heads_q=H, heads_kv=H, head_dim=D,
                    example_len_q=L, example_len_k=L)
    torch.manual_seed(0)
    module = method_class("routing")(spec)
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    layout = module.layout(q, k)
    clusters, window = module.clusters, module.local_window
    assert L % clusters == 0 and L % window == 0  # the model's L/c and L/P are then the kernel's ceilings

    def tile(q_index, k_index):  # G groups of Wq query slots by Wk key slots, per batch row and head
        return q_index.shape[2] * q_index.shape[3] * k_index.shape[3]

    kernel = B * H * (tile(layout.q_index, layout.k_index) + tile(layout.fallback_q_index, layout.fallback_k_index))

    def model(**options):
        flops, _ = cost_model.cost_expr("routing", clusters=clusters, local_window=window, **options).evaluate(
            B=B, H=H, Lq=L, Lk=L, D=D)
        key_side = B * H * (2 * 2 * L * clusters * D + 2 * L * clusters)  # similarities, top-w selection
        return (flops - key_side) / (4 * D + 5)

    # Given the call's own fallback rows (its tiles x their rows, as a share of the queries), the count is
    # the kernel's up to the widest window union, 2P - 1 keys when some tile's first and last queries lie
    # at both ends of their block (here: all but sure).
    tiles, rows = layout.fallback_q_index.shape[2:]
    assert model(fallback_share=tiles * rows / L) == pytest.approx(kernel, rel=0.01)
    # By default the model counts 1/e of the queries (the mean share no cluster takes); the tiles round
    # each block's fallback queries up to whole tiles and every head up to the same tile count, so the
    # call computes more, but never more than full blocks, and (with the cluster tiles, counted
    # exactly) within a factor 1.3 here.
    assert model() <= kernel <= model(fallback_share=1.0)
    assert kernel < 1.3 * model()


def _at_optimum(method, variant="fixed"):
    """FLOPs with Lq = Lk = L, D = 64 and the parameter at its symbolic optimum."""
    cost = cost_model.cost_expr(method, variant=variant) if method == "combiner" else cost_model.cost_expr(method)
    parameter = cost_model.optimal_parameter(method, variant)
    return cost.flops.subs({c: parameter, s: parameter}).subs({Lq: L, Lk: L, D: 64, cost_model.B: 1, cost_model.H: 1})


@pytest.mark.parametrize("method, variant, order", [
    ("routing", "fixed", L ** sympy.Rational(3, 2)),
    ("combiner", "fixed", L ** sympy.Rational(3, 2)),
    ("combiner", "axial", L ** sympy.Rational(3, 2)),
    ("combiner", "logsparse", L * sympy.log(L)),
])
def test_asymptotic_order_at_the_optimal_parameter(method, variant, order):
    ratio = sympy.limit(_at_optimum(method, variant) / order, L, sympy.oo)
    assert ratio.is_finite and ratio > 0, ratio
    # ... and not of a smaller order
    assert sympy.limit(_at_optimum(method, variant) / (order / sympy.sqrt(sympy.log(L))), L, sympy.oo) == sympy.oo


def test_dense_is_quadratic():
    flops = cost_model.cost_expr("dense").flops.subs({Lq: L, Lk: L, D: 64, cost_model.B: 1, cost_model.H: 1})
    assert sympy.limit(flops / L**2, L, sympy.oo) == 4 * 64 + 5


def test_optimal_parameters_are_solved_symbolically():
    assert sympy.simplify(cost_model.optimal_parameter("combiner", "fixed") - sympy.sqrt(Lk)) == 0
    routing = cost_model.optimal_parameter("routing")
    # about sqrt(L) at Lq = Lk = L: sqrt(L (4D + 5) / (2 (2D + 1)))
    assert sympy.simplify(routing.subs({Lq: L, Lk: L}) - sympy.sqrt(L * (4 * D + 5) / (2 * (2 * D + 1)))) == 0


@pytest.mark.parametrize("method, choose", [
    ("routing", lambda n: cost_model.default_clusters(n, n, 64)),
    ("combiner", lambda n: cost_model.default_block(n, n, 64, "fixed")),
])
def test_defaults_minimise_the_flops_over_nearby_integers(method, choose):
    n = 4096
    best = choose(n)
    assert 0.5 * math.sqrt(n) <= best <= 2 * math.sqrt(n)
    key = "clusters" if method == "routing" else "block"

    def flops(value):
        return cost_model.cost_expr(method, **{key: value}).evaluate(B=1, H=1, Lq=n, Lk=n, D=64)[0]

    nearby = min(flops(v) for v in range(max(1, best // 2), 2 * best))
    assert flops(best) <= 1.01 * nearby


def test_defaults_are_clamped_to_the_lengths():
    assert cost_model.default_clusters(3, 1000, 64) <= 3
    assert cost_model.default_block(10, 10, 64, "logsparse") == 10
    assert cost_model.default_block(1, 1, 64) == 1


def test_growth_exponents():
    assert cost_model.growth_exponent("dense") == pytest.approx(2.0)
    # the fallback is linear in L: routing nears 1.5 only at long lengths
    assert 1.35 < cost_model.growth_exponent("routing") < 1.5
    assert cost_model.growth_exponent("routing", lengths=(2**20, 2**24)) == pytest.approx(1.5, abs=0.02)
    assert cost_model.growth_exponent("combiner") == pytest.approx(1.5, abs=0.01)


def test_sbm_hand_count_and_order():
    """SBM is linear in its edges: at a fixed density it stays quadratic (its saving is the density
    factor), and at a density falling as 1/L it is L log L."""
    Lq_, Lk_, D_, k_, rho_ = 16, 32, 2, 4, 0.25
    flops, _ = cost_model.cost_expr("sbm", clusters=k_, density=rho_).evaluate(B=1, H=1, Lq=Lq_, Lk=Lk_, D=D_)
    edges = rho_ * Lq_ * Lk_
    phi_and_memberships = (Lq_ + Lk_) * (2 * 2 * D_ * D_ + 2 * D_ * k_) + (Lq_ + Lk_) * k_
    block = 2 * k_ * k_ * D_
    sampling = edges * (3 * math.log2(Lk_ * k_) + math.log2(edges))
    attention = edges * (4 * D_ + 5)
    assert flops == pytest.approx(phi_and_memberships + block + sampling + attention)
    fixed = cost_model.cost_expr("sbm", clusters=128, density=0.01)
    assert sympy.limit(sympy.log(fixed.flops.subs({Lq: L, Lk: L})) / sympy.log(L), L, sympy.oo) == 2
    falling = cost_model.cost_expr("sbm", clusters=128, density=64 / L)
    ratio = falling.flops.subs({Lq: L, Lk: L}) / (L * sympy.log(L))
    assert sympy.limit(ratio, L, sympy.oo).is_finite and sympy.limit(ratio, L, sympy.oo) > 0
    dense = cost_model.cost_expr("dense").evaluate(B=1, H=8, Lq=4096, Lk=4096, D=64)[0]
    sparse = fixed.evaluate(B=1, H=8, Lq=4096, Lk=4096, D=64)[0]
    assert 0.02 < sparse / dense < 0.15  # 1% of the pairs, plus sampling and phi


def test_sparsefinder_hand_count_per_predictor():
    Lq_, Lk_, D_, r_, rho_ = 16, 32, 2, 4, 0.25
    edges = rho_ * Lq_ * Lk_
    common = 2 * D_ * r_ * (Lq_ + Lk_) + edges * math.log2(edges) + edges * (4 * D_ + 5)
    predictors = {
        "distance": (3 * r_ + 1) * Lq_ * Lk_,
        "quantization": r_ * (Lq_ * math.log2(Lq_) + Lk_ * math.log2(Lk_)) + r_ * Lq_ * 8,
        "clustering": (Lq_ + Lk_) * 5 * (3 * r_ + 1),
    }
    for predictor, predict in predictors.items():
        cost = cost_model.cost_expr("sparsefinder", predictor=predictor, rank=r_, density=rho_, clusters=5,
                                    bucket_size=8)
        flops, _ = cost.evaluate(B=1, H=1, Lq=Lq_, Lk=Lk_, D=D_)
        assert flops == pytest.approx(common + predict), predictor
    # distance is all-pairs: quadratic whatever the density; the others follow the density
    assert sympy.limit(sympy.log(cost_model.cost_expr("sparsefinder", predictor="distance", density=1 / L)
                                 .flops.subs({Lq: L, Lk: L})) / sympy.log(L), L, sympy.oo) == 2
    with pytest.raises(ValueError, match="unknown sparsefinder predictor 'lsh'"):
        cost_model.cost_expr("sparsefinder", predictor="lsh")


def test_cost_of_a_found_site_uses_its_dims_and_the_method_defaults():
    case = by_name("hand-sdpa-causal")
    args, kwargs = case.inputs(2, 8)
    site = attnpass.find_attention(case.build(), args, kwargs).sites[0]
    dense = attnpass.cost(site)
    # batch and length are symbolic in the captured graph; heads and head dim are not
    assert {str(x) for x in dense.flops.free_symbols} == {"B", "L_q", "L_k"}
    assert dense.flops.subs({cost_model.B: 2, Lq: 8, Lk: 8}) == 2 * 4 * 8 * 8 * (4 * 8 + 5)
    routing = attnpass.cost(site, "routing", clusters=2)
    assert routing.params == {"clusters": 2} and "routing (clusters=2)" in str(routing)


def test_cost_with_known_lengths_fills_in_the_default():
    class Site:  # the fields cost() reads, all known
        batch, heads_q, len_q, len_k, head_dim = 1, 8, 4096, 4096, 64

    routing = attnpass.cost(Site(), "routing")
    assert routing.params["clusters"] == cost_model.default_clusters(4096, 4096, 64)
    flops, nbytes = routing.evaluate()
    dense_flops, _ = attnpass.cost(Site(), "dense").evaluate()
    assert 20 < dense_flops / flops < 40 and nbytes > 0
    assert attnpass.cost(Site(), "combiner", variant="axial").params["block"] == cost_model.default_block(4096, 4096, 64, "axial")


@pytest.mark.parametrize("call, message", [
    (lambda: attnpass.cost(None, "magic"), "magic"),
    (lambda: attnpass.cost(None, "routing", block=3), "block"),
    (lambda: attnpass.cost(None, "combiner", variant="diagonal"), "diagonal"),
    (lambda: cost_model.cost_expr("dense").evaluate(B=1), "no value"),
    (lambda: cost_model.cost_expr("dense").evaluate(X=1), "X"),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
