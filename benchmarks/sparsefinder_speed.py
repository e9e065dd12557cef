"""Speed of Sparsefinder's predicted entmax-1.5 attention on CPU (issue 4's acceptance).

    python benchmarks/sparsefinder_speed.py [--length 4096] [--out docs/benchmarks_sparsefinder.md]

One attention layer, B=1, H=8, D=64, fp32, bidirectional, forward (eval, no grad), all in one run:
- full entmax-1.5: scores + `entmax.entmax15` + P.V on the dense graph (the thing Sparsefinder avoids);
- dense softmax `F.scaled_dot_product_attention` (the speed reference);
- attnpass's Sparsefinder site, per predictor: projection + predictor + entmax-1.5 over the
  predicted pairs (`SparsefinderAttention.forward`: the CSR edge kernel; on CPU the quantization
  predictor's buckets go through the block kernel `quantile_bucket_attention`; one more row runs
  the same bucket-16 graph through the edge kernel, for the block kernel's gain), with recall,
  graph sparsity and computation sparsity of its graph against the gold entmax graph printed next
  to the timing.

q, k come from an entmax-1.5 layer over token + sinusoidal position embeddings (Zipf tokens,
W_K = W_Q + noise: content and locality, the mix seen in trained models), so the gold graph has
realistic entmax sparsity. The projections are trained (Adam, hinge loss) on shorter sequences of
the same layer (--train-length), then applied at --length; clustering centroids are fitted on the
training sequences. Timings are the median of --repeats calls (full entmax15 and distance: one call).
The machine's 2 cores are shared: compare ratios from one run only.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from entmax import entmax15

from attnpass.lowering.torch.edge_attention import edge_attention
from attnpass.methods import SiteSpec, method_class
from attnpass.methods.sparsefinder import gold as sf_gold, metrics as sf_metrics

B, H, D, E, VOCAB = 1, 8, 64, 64, 512
# (predictor, setting shown in the table, options, through the CSR edge kernel); quantization at
# three bucket sizes (its speed / recall trade-off), and bucket 16 once more through the edge kernel
# (the path before the block kernel): what blocks buy
RUNS = [
    ("distance", None, dict(predictor="distance"), False),
    ("quantization", "bucket 16", dict(predictor="quantization", bucket_size=16), False),
    ("quantization", "bucket 16, edge kernel", dict(predictor="quantization", bucket_size=16), True),
    ("quantization", "bucket 64", dict(predictor="quantization", bucket_size=64), False),
    ("quantization", "bucket 256", dict(predictor="quantization", bucket_size=256), False),
    ("clustering", "128 clusters, top 2", dict(predictor="clustering", clusters=128, top_clusters=2), False),
]


def entmax_layer_qkv(length: int, seed: int):
    g = torch.Generator().manual_seed(0)  # the layer's weights: fixed
    emb = torch.randn(VOCAB, E, generator=g)
    w_q = torch.randn(E, H * D, generator=g) / math.sqrt(E)
    w_k = w_q + 0.3 * torch.randn(E, H * D, generator=g) / math.sqrt(E)
    w_v = torch.randn(E, H * D, generator=g) / math.sqrt(E)
    t = torch.arange(length).unsqueeze(1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, E, 2) / E)
    pos = torch.zeros(length, E)
    pos[:, 0::2], pos[:, 1::2] = torch.sin(t * freq), torch.cos(t * freq)
    tokens = torch.multinomial(1.0 / torch.arange(1, VOCAB + 1).float(), B * length, replacement=True,
                               generator=torch.Generator().manual_seed(seed)).view(B, length)
    x = emb[tokens] + pos

    def heads(w):
        return (x @ w).view(B, length, H, D).transpose(1, 2).contiguous()

    return heads(w_q), heads(w_k), heads(w_v)


def edge_kernel_forward(module):
    """The site's prediction + entmax-1.5 on the CSR edge kernel (no bias, mask or padding here)."""
    def forward(q, k, v):
        row_ptr, col, _ = module.predict(q, k)
        return edge_attention(q, k, v, row_ptr, col, scale=module.scale(q), normalizer=module.normalizer)[0]
    return forward


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--train-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    L = args.length
    scale = D ** -0.5

    spec = SiteSpec(name="bench", scale=None, heads_q=H, heads_kv=H, head_dim=D, example_len_q=L, example_len_k=L)
    q_train, k_train, _ = entmax_layer_qkv(args.train_length, seed=1)
    trainer = method_class("sparsefinder")(spec, predictor="distance").train()
    gold_train = sf_gold.gold_pairs(q_train, k_train, scale=scale)
    opt = torch.optim.Adam(trainer.parameters(), lr=3e-2)
    start = time.perf_counter()
    for _ in range(args.steps):
        opt.zero_grad()
        loss = trainer.projection_loss(q_train, k_train, gold=gold_train)
        loss.backward()
        opt.step()
    print(f"trained the projections: {args.steps} steps at L={args.train_length} in "
          f"{time.perf_counter() - start:.1f} s, hinge loss {loss.item():.4f}")

    q, k, v = entmax_layer_qkv(L, seed=2)
    start = time.perf_counter()
    gold = sf_gold.gold_pairs(q, k, scale=scale)
    print(f"gold entmax graph at L={L}: {gold[0].numel() / (B * H * L):.1f} keys per query "
          f"({time.perf_counter() - start:.1f} s)")

    rows = []
    with torch.no_grad():
        def full_entmax():
            return entmax15(q @ k.transpose(-1, -2) * scale, dim=-1) @ v

        t_entmax = timed(full_entmax, 1)
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        print(f"full entmax15 {t_entmax:.3f} s   dense SDPA {t_sdpa:.4f} s")
        for name, detail, options, on_edge_kernel in RUNS:
            module = method_class("sparsefinder")(spec, **options).eval()
            module.w_q.data.copy_(trainer.w_q.data)
            module.w_k.data.copy_(trainer.w_k.data)
            if name == "distance":
                module.threshold_.copy_(trainer.threshold_)
            if name == "clustering":
                for _ in range(20):
                    module.update_centroids_(q_train, k_train)
            # distance keeps a large share of the pairs (its cost is all-pairs anyway): one call
            forward = edge_kernel_forward(module) if on_edge_kernel else module
            t = timed(lambda f=forward: f(q, k, v), 1 if name == "distance" else args.repeats)
            row_ptr, col, candidates = module.predict(q, k)
            metrics = sf_metrics.graph_metrics(q, k, row_ptr, col, scale=scale, gold=gold,
                                       predictor_ops=module.predictor_ops(q, k, candidates))
            if detail is None:
                detail = f"threshold {module.threshold:.3g}"
            rows.append((name, detail, t, t_entmax / t, t_sdpa / t, metrics))
            print(f"{name:12s} {t:.4f} s   {t_entmax / t:7.1f}x vs full entmax15   {t_sdpa / t:5.2f}x vs SDPA   "
                  f"recall {metrics.recall:.3f}  graph sparsity {metrics.graph_sparsity:.4f}  "
                  f"exact {metrics.exact_fraction:.3f}  computation sparsity {metrics.computation_sparsity:.4f}")

    if args.out:
        lines = [
            "# Sparsefinder speed (CPU)",
            "",
            f"Generated by `python benchmarks/sparsefinder_speed.py --out {args.out}`: one attention layer, "
            f"B={B}, H={H}, D={D}, fp32, bidirectional, forward, L={L}. q, k, v from an entmax-1.5 layer over "
            f"Zipf tokens + sinusoidal positions ({gold[0].numel() / (B * H * L):.1f} gold keys per query); "
            f"projections (rank 4) trained {args.steps} Adam steps on L={args.train_length} sequences of the "
            "same layer. Median of "
            f"{args.repeats} calls (full entmax15 and distance: 1 call). 2 shared CPU cores: ratios from one run only.",
            "",
            f"Full entmax15 (scores + entmax15 + PV): {t_entmax:.3f} s; dense SDPA: {t_sdpa:.4f} s.",
            "",
            "| predictor | setting | time (s) | vs full entmax15 | vs SDPA | recall | graph sparsity | exact fraction "
            "| computation sparsity |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, detail, t, vs_entmax, vs_sdpa, m in rows:
            lines.append(f"| {name} | {detail} | {t:.4f} | {vs_entmax:.1f}x | {vs_sdpa:.2f}x | {m.recall:.3f} | "
                         f"{m.graph_sparsity:.4f} | {m.exact_fraction:.3f} | {m.computation_sparsity:.4f} |")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
