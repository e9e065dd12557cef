"""Peak memory of an SBM attention call per sampled edge: the figure behind
`attnpass.methods.sbm.BYTES_PER_EDGE`, which sizes the refusal of calls that would not fit.

    python benchmarks/sbm_memory_per_edge.py [--lengths 2048 4096]

One SBM layer with its defaults (untrained: ~22% of pairs), B=1, H=8, D=64, fp32, bidirectional,
each (length, mode) in a fresh process: the rise of the process's peak RSS over one call (eval: a
no-grad forward; train: forward and backward), divided by the edges of the sampled graph.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def measure(length: int, train: bool) -> None:
    import torch

    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sbm import SBMAttention

    torch.manual_seed(0)
    site = SBMAttention(SiteSpec(name="s", scale=None, heads_q=8, heads_kv=8, head_dim=64)).train(train)
    site.keep_graph = True
    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=train) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if train:
        site(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            site(q, k, v)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    edges = site.last_graph.nnz
    print(f"| {length} | {'train' if train else 'eval'} | {edges / 1e6:.1f}M | {edges / (8 * length * length):.1%} | "
          f"{peak_kib / 1024:.0f} | {peak_kib * 1024 / edges:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # length, mode: run in this process
    args = parser.parse_args()
    if args.one:
        measure(int(args.one[0]), args.one[1] == "train")
        return
    print("| L | mode | edges | of all pairs | peak rise (MiB) | bytes per edge |")
    print("|---:|---|---:|---:|---:|---:|")
    for length in args.lengths:
        for mode in ("eval", "train"):
            subprocess.run([sys.executable, __file__, "--one", str(length), mode], check=True)


if __name__ == "__main__":
    main()
