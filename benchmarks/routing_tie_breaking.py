"""What breaking routing's selection ties by the lowest index costs (issue 22).

    python benchmarks/routing_tie_breaking.py [--lengths 4096 16384] [--repeats 5]

One routing attention layer (attnpass's `RoutingAttention`, eval, no grad), B=1, H=8, D=64, fp32,
bidirectional, clusters from the cost model: the forward with the cluster members chosen by
`topk_lowest_index` (ties to the lowest position, as ONNX TopK) against the same forward with
plain `torch.topk` (ties in an unspecified order), interleaved in one run; also the selection alone
(the (B, H, c, L) similarity's top-`width`). Medians over --repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnpass.methods.kmeans as kmeans
from attnpass.methods.base import SiteSpec
from attnpass.methods.routing import RoutingAttention


def _plain_topk(sim, width):
    return sim.topk(width, dim=-1, sorted=False).indices


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    ordered = kmeans.topk_lowest_index
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| L | forward, plain topk (ms) | forward, lowest-index ties (ms) | ratio | selection, plain (ms) | selection, lowest-index (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        spec = SiteSpec(name="bench", scale=None, heads_q=8, heads_kv=8, head_dim=64,
                        example_len_q=length, example_len_k=length)
        site = RoutingAttention(spec).eval()
        q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
        with torch.no_grad():
            site(q, k, v)  # initialises the centroids from the first batch
            sim = torch.randn(1, 8, site.kmeans.clusters, length)
            width = max(1, length // site.kmeans.clusters)
            for select in (_plain_topk, ordered):
                kmeans.topk_lowest_index = select
                _seconds(lambda: site(q, k, v))  # warm-up
            rounds = {"plain": [], "ordered": [], "sel_plain": [], "sel_ordered": []}
            for _ in range(args.repeats):
                for name, select in (("plain", _plain_topk), ("ordered", ordered)):
                    kmeans.topk_lowest_index = select
                    rounds[name].append(_seconds(lambda: site(q, k, v)))
                    rounds["sel_" + name].append(_seconds(lambda: select(sim, width)))
            kmeans.topk_lowest_index = ordered
            results = {name: statistics.median(times) * 1e3 for name, times in rounds.items()}
        print(f"| {length} | {results['plain']:.1f} | {results['ordered']:.1f} | "
              f"{results['plain'] / results['ordered']:.2f}x | {results['sel_plain']:.1f} | {results['sel_ordered']:.1f} |")


if __name__ == "__main__":
    main()
