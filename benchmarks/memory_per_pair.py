"""Peak memory per computed pair of the methods whose pair count depends on the data: the figures
behind `attnpass.methods.sbm.BYTES_PER_EDGE` and `attnpass.methods.sparsefinder.BYTES_PER_PAIR`,
which size the refusal of calls that would not fit (`attnpass.memory_guard`).

    python benchmarks/memory_per_pair.py [--lengths 2048 4096] [--methods sbm sparsefinder]

One layer with the method's defaults (untrained), B=1, H=8, D=64, fp32, bidirectional, each
(method, length, mode) in a fresh process: the rise of the process's peak RSS over one call (eval:
a no-grad forward; train: forward and backward), divided by the count each method's memory check
multiplies: SBM's expected number of drawn edges (duplicates included), Sparsefinder's candidate
pairs before duplicates are merged.
"""
from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys


def _site(method: str):
    from attnpass.methods.base import SiteSpec
    from attnpass.methods.sbm import SBMAttention
    from attnpass.methods.sparsefinder import SparsefinderAttention

    spec = SiteSpec(name="s", scale=None, heads_q=8, heads_kv=8, head_dim=64)
    # SBM without its density cap: the untrained graph's density (~25%), the figure docs/memory.md reports
    return SBMAttention(spec, max_density=None) if method == "sbm" else SparsefinderAttention(spec)


def _pairs(method: str, site, q, k) -> int:
    import torch

    from attnpass.methods.sbm.sampling import expected_edge_count

    with torch.no_grad():
        if method == "sbm":
            return round(expected_edge_count(*site.memberships(q, k, None)))
        return site.predict(q, k)[2]


def measure(method: str, length: int, train: bool) -> None:
    import torch

    torch.manual_seed(0)
    site = _site(method).train(train)
    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=train) for _ in range(3))
    with torch.no_grad():  # initial state (Sparsefinder's centroids) from a short call: the peak stays the measure's
        site(q[:, :, :256], k[:, :, :256], v[:, :, :256])
    as_called = copy.deepcopy(site)  # training moves Sparsefinder's centroids: count on the state the call saw
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if train:
        site(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            site(q, k, v)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    pairs = _pairs(method, as_called.eval(), q.detach(), k.detach())  # after: counting allocates what the call did
    print(f"| {method} | {length} | {'train' if train else 'eval'} | {pairs / 1e6:.1f}M | "
          f"{pairs / (8 * length * length):.1%} | {peak_kib / 1024:.0f} | {peak_kib * 1024 / pairs:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=["sbm", "sparsefinder"])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # method, length, mode: in this process
    args = parser.parse_args()
    if args.one:
        measure(args.one[0], int(args.one[1]), args.one[2] == "train")
        return
    print("| method | L | mode | pairs counted | of all pairs | peak rise (MiB) | bytes per pair |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for method in args.methods:
        for length in args.lengths:
            for mode in ("eval", "train"):
                subprocess.run([sys.executable, __file__, "--one", method, str(length), mode], check=True)


if __name__ == "__main__":
    main()
