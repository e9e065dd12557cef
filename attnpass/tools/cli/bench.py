"""`attnpass bench`: a quick built-in speed suite, one attention layer, dense SDPA against each method.

For every length L: random q, k, v of shape (B, H, L, D) (fp32, default B=1, H=8, D=64), dense
`F.scaled_dot_product_attention` and each method's site module (built as `sparsify` would build it
for a site of that shape, default options unless `--opt` says otherwise), forward only, in eval mode
under no_grad. Each point: one warm-up call, then the median of `--repeats` timed calls. The table
shows milliseconds and the ratio SDPA time / method time (above 1: faster than dense).

This is the quick look. The full benchmarks (forward + backward, up to 16k tokens, peak memory,
growth against the cost model) are the scripts in the repository's `benchmarks/`; they take minutes.
Timings on a shared machine move between runs: compare ratios from one run only.
"""
from __future__ import annotations

import functools
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnpass.tools.cli import (  # its shared parts
    EXIT_OK,
    CliError,
    check_method_options,
    options_for,
    parse_methods,
    parse_options,
    print_table,
    use_rich,
)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise CliError(f"--lengths {text!r}: expected comma-separated integers, e.g. 256,1024") from e
    if not lengths or any(n < 2 for n in lengths):
        raise CliError(f"--lengths {text!r}: every length must be an integer >= 2")
    return lengths


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lazy state (routing / Sparsefinder centroids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def site_module(method: str, length: int, heads: int, head_dim: int, causal: bool, opts: dict):
    """The module `sparsify` would attach to a self-attention site of this shape."""
    from attnpass.methods import SiteSpec, method_class

    spec = SiteSpec(name=f"bench L={length}", scale=None, causal=causal, heads_q=heads, heads_kv=heads,
                    head_dim=head_dim, example_len_q=length, example_len_k=length)
    cls = method_class(method)
    reason = cls.unsupported_reason(spec, **opts)
    if reason:
        raise CliError(f"method {method!r} cannot serve the benchmark site: {reason}")
    return cls(spec, **opts).eval()


def run_suite(lengths: list[int], methods: list[str], options: dict, *, batch: int = 1, heads: int = 8,
              head_dim: int = 64, repeats: int = 3, causal: bool = False, progress: bool = True) -> list[dict]:
    """One row per (length, method), SDPA included: median seconds, SDPA's median seconds, their ratio."""
    from tqdm import tqdm

    steps = [(n, m) for n in lengths for m in ["sdpa", *methods]]
    rows, sdpa = [], {}
    bar = tqdm(steps, desc="attnpass bench", unit="run", file=sys.stderr, disable=not progress, leave=False)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    with torch.no_grad():
        for n, m in bar:
            bar.set_postfix_str(f"L={n} {m}")
            if n not in tensors:
                tensors = {n: [torch.randn(batch, heads, n, head_dim, generator=generator) for _ in range(3)]}
            q, k, v = tensors[n]
            if m == "sdpa":
                sdpa[n] = _median_seconds(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                                          repeats)
                rows.append({"length": n, "method": "sdpa", "seconds": sdpa[n], "sdpa_seconds": sdpa[n],
                             "speedup_vs_sdpa": 1.0, "options": "torch.nn.functional.scaled_dot_product_attention"})
                continue
            torch.manual_seed(0)  # methods' initial state (SBM clusters, Sparsefinder projections)
            module = site_module(m, n, heads, head_dim, causal, options_for(m, options))
            seconds = _median_seconds(functools.partial(module, q, k, v), repeats)
            rows.append({"length": n, "method": m, "seconds": seconds, "sdpa_seconds": sdpa[n],
                         "speedup_vs_sdpa": sdpa[n] / seconds, "options": module.extra_repr()})
    bar.close()
    return rows


def run(args) -> int:
    from attnpass.methods import METHODS

    lengths = parse_lengths(args.lengths)
    methods = parse_methods(args.methods, list(METHODS))
    options = parse_options(args.opt)
    for m in methods:
        check_method_options(m, options_for(m, options))
    if args.repeats < 1 or args.batch < 1 or args.heads < 1 or args.head_dim < 1:
        raise CliError("--repeats, --batch, --heads and --head-dim must be >= 1")
    rows = run_suite(lengths, methods, options, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                     repeats=args.repeats, causal=args.causal, progress=not (args.no_progress or args.json))
    setup = {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
             "causal": args.causal, "repeats": args.repeats, "pass": "forward, eval, no_grad",
             "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps({"setup": setup, "results": rows}, indent=2))
        return EXIT_OK
    table = []
    for n in lengths:
        cells = {"L": str(n)}
        for r in (r for r in rows if r["length"] == n):
            cells[f"{r['method']} ms"] = f"{1e3 * r['seconds']:.2f}"
            if r["method"] != "sdpa":
                cells[f"{r['method']} x"] = f"{r['speedup_vs_sdpa']:.2f}"
        table.append(cells)
    title = (f"one attention layer, B={args.batch} H={args.heads} D={args.head_dim} fp32"
             f"{' causal' if args.causal else ''}, forward, median of {args.repeats}, {setup['threads']} threads; "
             "x = SDPA time / method time (> 1: faster than dense)")
    print_table(table, title, use_rich(args))
    return EXIT_OK
