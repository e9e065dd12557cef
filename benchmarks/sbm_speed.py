"""Speed of attnpass's SBM attention against dense SDPA on CPU (issue 4's SBM benchmark).

    python benchmarks/sbm_speed.py [--lengths 1024 4096 16384] [--out docs/benchmarks_sbm.md]

One attention layer, B=1, H=8, D=64, fp32, bidirectional, 128 clusters, all in one run:
SBM's forward (eval: fixed-seed graph; memberships, fastRG sampling and the edge kernel) and
forward+backward (train: fresh graph, straight-through gradients, density regulariser) against
dense `F.scaled_dot_product_attention`, at the edge density each configuration samples.

SBM's density is learned (the density regulariser pushes it down during training); a random
initialisation samples about 20-25% of the pairs. The table shows that initial state and
configurations whose memberships are shifted to sample about 5%, 1% and 0.1% of the pairs, the
range trained SBM models report; the measured density is printed next to each time. A
configuration whose graph would not fit in memory at a length (the 20-25% one at 16k: ~500M edges)
is skipped, and the table says so.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from attnpass.methods import SiteSpec
from attnpass.methods.sbm import SBMAttention

B, H, D, CLUSTERS = 1, 8, 64, 128
# membership logit shift -> roughly the density it samples (sigmoid(shift)^2)
CONFIGS = {"as initialised": None, "~5%": -1.5, "~1%": -2.3, "~0.1%": -3.5}
MAX_EDGES = 50_000_000  # beyond this many expected edges a run is skipped (several GB of edge arrays, minutes per call)


def make_site(length: int, shift: float | None) -> SBMAttention:
    torch.manual_seed(0)
    site = SBMAttention(SiteSpec(name="bench", scale=None, heads_q=H, heads_kv=H, head_dim=D,
                                 example_len_q=length, example_len_k=length), clusters=CLUSTERS,
                        max_density=None)  # the density each configuration samples, not the default cap
    if shift is not None:
        with torch.no_grad():
            # phi's output gets a constant part along which every cluster embedding has logit `shift`,
            # plus the random part scaled down: memberships ~ sigmoid(shift) with some spread
            site.phi[2].weight.mul_(0.2)
            site.phi[2].bias.fill_(1.0)
            site.clusters.mul_(0.2).add_(shift / D)
    return site


def train_step(site: SBMAttention | None, qkv: list[torch.Tensor]) -> None:
    """One forward+backward: SDPA when site is None, else the SBM site with its density loss."""
    if site is None:
        F.scaled_dot_product_attention(*qkv).sum().backward()
    else:
        (site(*qkv).sum() + site.aux_loss()).backward()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    rows = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, length, D, generator=g) for _ in range(3))
        repeats = 3 if length <= 4096 else 1
        with torch.no_grad():
            sdpa = timed(functools.partial(F.scaled_dot_product_attention, q, k, v), repeats)
        grads = [t.clone().requires_grad_() for t in (q, k, v)]
        sdpa_train = timed(functools.partial(train_step, None, grads), repeats)
        rows.append((length, "sdpa", 1.0, sdpa, sdpa_train, None, "", ""))
        print(f"L={length}: sdpa fwd {sdpa * 1e3:.1f} ms, fwd+bwd {sdpa_train * 1e3:.1f} ms", flush=True)
        for name, shift in CONFIGS.items():
            site = make_site(length, shift).eval()
            with torch.no_grad():
                y_q, y_k, block = site.memberships(q, k, None)
                expected = (torch.einsum("nu,nuv,nv->n", y_q.sum(1), block, y_k.sum(1)).sum()).item()
            if expected > MAX_EDGES:
                rows.append((length, f"sbm {name}", expected / (H * length**2), None, None, None, "", ""))
                print(f"  sbm {name}: skipped ({expected:.3g} expected edges)", flush=True)
                continue
            with torch.no_grad():
                fwd = timed(functools.partial(site, q, k, v), repeats)
                t0 = time.perf_counter()
                graph = site.sample(q, k)
                sampling = time.perf_counter() - t0
            density = graph.nnz / (H * length**2)
            site.train()
            train = timed(functools.partial(train_step, site, grads), repeats)
            rows.append((length, f"sbm {name}", density, fwd, train, (sampling, graph.nnz),
                         f"{sdpa / fwd:.2f}x", f"{sdpa_train / train:.2f}x"))
            print(f"  sbm {name}: density {density:.4f}, fwd {fwd * 1e3:.1f} ms (sampling {sampling * 1e3:.1f}), "
                  f"fwd+bwd {train * 1e3:.1f} ms -> {sdpa / fwd:.2f}x / {sdpa_train / train:.2f}x SDPA", flush=True)

    lines = [
        "| L | attention | edge density | forward ms | of which sampling ms (us/edge) | fwd+bwd ms "
        "| speed-up fwd vs SDPA | fwd+bwd vs SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, name, density, fwd, train, sampled, r1, r2 in rows:
        if fwd is None:
            lines.append(f"| {length} | {name} | {density:.3f} (expected) | skipped: graph too large | | | | |")
            continue
        sampling = "" if sampled is None else f"{sampled[0] * 1e3:.1f} ({sampled[0] / max(sampled[1], 1) * 1e6:.2f})"
        lines.append(f"| {length} | {name} | {density:.4f} | {fwd * 1e3:.1f} | {sampling} | {train * 1e3:.1f} "
                     f"| {r1} | {r2} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (f"# SBM attention vs dense SDPA (CPU, {torch.get_num_threads()} threads)\n\n"
                  "Generated by `python benchmarks/sbm_speed.py --out docs/benchmarks_sbm.md`; B=1, H=8, D=64, fp32, "
                  f"bidirectional, {CLUSTERS} clusters. See the script's docstring for how densities are set.\n\n")
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
