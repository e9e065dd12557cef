"""Compiled sparse vs compiled dense: torch.compile(model, backend=attnpass.backend(method=...)) against
torch.compile(model) (Inductor default) and against the eager sparsified model, forward, on a
Llama-style config on CPU.

    python benchmarks/compile_speed.py --lengths 4096 8192 [--methods combiner routing] [--out FILE]

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


def compiled_with_attnpass(method: str, model: torch.nn.Module, ids, mask):
    """`model` compiled with the attnpass backend of `method`, its sites traced into the graph. A method
    with state is bound to the model, and its first call (the graph run eagerly while its sites
    initialise their state) initialises it; the model is then compiled afresh, reusing the attached,
    initialised modules, so the timed first call is the compilation alone."""
    if METHODS[method]:
        backend = attnpass.backend(method, model=model)
        with torch.no_grad():
            torch.compile(model, backend=backend)(ids, attention_mask=mask)
        torch._dynamo.reset()
    backend = attnpass.backend(method, model=model) if METHODS[method] else attnpass.backend(method)
    return torch.compile(model, backend=backend), backend


def eager_options(method: str, backend) -> dict:
    """The sparsified model's options that make it the compiled one: routing's default cluster count
    follows the example call's length, so the compiled model's (chosen at the timed length) is passed
    on to sparsify, whose example call is short."""
    if method != "routing":
        return {}
    (clusters,) = {m.clusters for m in backend.site_modules().values()}
    return {"clusters": clusters}


# method -> whether it keeps state (its backend is bound to the model)
METHODS = {"combiner": False, "routing": True}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
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

        def run(label, model):
            with torch.no_grad():
                t = time.perf_counter()
                model(ids, attention_mask=mask)  # compile + first run
                first = time.perf_counter() - t
                best = timed(functools.partial(model, ids, attention_mask=mask), args.repeats)
            print(f"L={length} {label}: {best:.3f} s (first call {first:.1f} s)", flush=True)
            return best

        torch._dynamo.reset()
        dense = run("dense (inductor)", torch.compile(build(args.layers, args.hidden, args.heads, args.kv_heads)))
        for method in args.methods:
            torch._dynamo.reset()
            compiled, backend = compiled_with_attnpass(method, build(args.layers, args.hidden, args.heads, args.kv_heads),
                                                       ids, mask)
            sparse = run(f"{method} (attnpass)", compiled)
            graph = backend.report.graphs[-1] if backend.report.graphs else None
            if graph is None or graph.skipped or len(graph.rewritten) != args.layers or graph.cut_at:
                raise SystemExit(f"L={length}: the attnpass backend did not trace every site into the graph, so this "
                                 f"would not time the compiled method:\n{backend.report}")
            eager_model = attnpass.sparsify(build(args.layers, args.hidden, args.heads, args.kv_heads),
                                            args=(ids[:, :256],), kwargs=dict(attention_mask=mask[:, :256]), method=method,
                                            **eager_options(method, backend))
            eager = run(f"{method} (sparsify, eager)", eager_model)
            rows.append((length, method, dense, sparse, eager))
    head = (f"Llama-style model: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
            f"batch 1, fp32, CPU, forward, best of {args.repeats}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n\n")
    table = ("| L | method | compiled dense (Inductor) | compiled method (attnpass) | speed-up | eager sparsify | "
             "compiled vs eager |\n|---|---|---|---|---|---|---|\n")
    table += "".join(f"| {n} | {m} | {d:.3f} s | {s:.3f} s | {d / s:.1f}x | {e:.3f} s | {e / s:.2f}x |\n"
                     for n, m, d, s, e in rows)
    print(head + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + table)


if __name__ == "__main__":
    main()
