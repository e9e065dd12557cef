"""Compiled sparse vs compiled dense: torch.compile(model, backend=attnpass.backend(method=...)) against
torch.compile(model) (Inductor default), forward, on a Llama-style config on CPU.

    python benchmarks/compile_speed.py --lengths 4096 8192 [--out FILE]

It prints the table of docs/compile.md's "Benchmark" section (--out also writes it to FILE, to paste
there: that document holds more than the table, so the script does not write it). Both models are
the same randomly initialised LlamaModel (transformers, eager attention spelling); ratios are
measured in one run (the machine's cores are shared: compare ratios, not seconds).
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
import torch._dynamo
import transformers

import attnpass


def build(layers: int, hidden: int, heads: int, kv_heads: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=1 << 16,
                                      use_cache=False, return_dict=False, attn_implementation="eager")
    return transformers.LlamaModel(config).eval()


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 1000, (1, length))
        mask = torch.ones(1, length, dtype=torch.long)
        times = {}
        for label, backend in (("dense (inductor)", "inductor"), ("combiner (attnpass)", attnpass.backend("combiner"))):
            torch._dynamo.reset()
            model = torch.compile(build(args.layers, args.hidden, args.heads, args.kv_heads), backend=backend)
            with torch.no_grad():
                t = time.perf_counter()
                model(ids, attention_mask=mask)  # compile + first run
                first = time.perf_counter() - t
                times[label] = (timed(functools.partial(model, ids, attention_mask=mask), args.repeats), first)
            if not isinstance(backend, str) and (backend.report.skipped or not backend.report.rewritten):
                raise SystemExit(f"L={length}: the attnpass backend did not rewrite every site, so this would time "
                                 f"dense against dense:\n{backend.report}")
            print(f"L={length} {label}: {times[label][0]:.3f} s (first call {first:.1f} s)", flush=True)
        dense, sparse = times["dense (inductor)"][0], times["combiner (attnpass)"][0]
        rows.append((length, dense, sparse, dense / sparse))
    head = (f"Llama-style model: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
            f"batch 1, fp32, CPU, forward, best of {args.repeats}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n\n")
    table = "| L | compiled dense (Inductor) | compiled Combiner (attnpass) | speed-up |\n|---|---|---|---|\n"
    table += "".join(f"| {n} | {d:.3f} s | {s:.3f} s | {r:.1f}x |\n" for n, d, s, r in rows)
    print(head + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + table)


if __name__ == "__main__":
    main()
