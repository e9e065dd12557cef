"""onnxruntime on attnpass's sparse ONNX exports against the dense exports of the same model.

    python benchmarks/onnx_speed.py [--lengths 4096 16384] [--repeats 3]

A long-context Llama config (2 layers, hidden 128, 2 query heads of 64, 1 kv head (GQA), causal,
16k positions, random weights), exported ONCE per method with dynamic axes from a (2, 256) example,
then run by onnxruntime (CPU, default threads) at batch 1 and each length, forward only, all in one
run. Rows:

- "plain"    the model exported by the standard exporter alone (torch.onnx.export, dynamo=True),
             no attnpass: HF's own SDPA attention as lowered by torchlib;
- "dense"    attnpass method="dense": one attnpass.Attention node per site (L x L scores);
- "combiner" method="combiner" (fixed, default block round(sqrt(L)) computed in the graph);
- "routing"  method="routing" with 128 clusters (about sqrt(16k); the centroids come from the
             example's tokens, untrained), local_window 64.

Times are medians of `--repeats` runs after one warm-up run; the ratio is the dense export's time
over the method's. The machine (2 CPU cores) is shared, so absolute times move between runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import onnxruntime as ort
import torch
import transformers

import attnpass

EXAMPLE = (2, 256)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16384, use_cache=False, return_dict=False,
    )
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()


def inputs(batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(length)
    return {"input_ids": torch.randint(3, 1000, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.int64)}


def export_plain(model, kwargs, path) -> None:
    shapes = {name: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for name in kwargs}
    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    torch.onnx.export(program, (), dynamo=True, verbose=False).save(path)


def time_session(path: str, feeds: dict, repeats: int) -> float:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = build_model()
    example = inputs(*EXAMPLE)
    folder = tempfile.mkdtemp(prefix="attnpass_onnx_bench_")
    files, export_seconds = {}, {}
    specs = [("plain", None, {}), ("dense", "dense", {}), ("combiner", "combiner", {}),
             ("routing", "routing", {"clusters": 128})]
    for name, method, options in specs:
        path = os.path.join(folder, f"{name}.onnx")
        start = time.perf_counter()
        if method is None:
            export_plain(model, example, path)
        else:
            attnpass.export_onnx(model, kwargs=example, f=path, method=method, **options)
        export_seconds[name] = time.perf_counter() - start
        files[name] = path
    print("exports (s): " + ", ".join(f"{k} {v:.1f}" for k, v in export_seconds.items()))

    rows = []
    for length in args.lengths:
        feeds = {k: v.numpy() for k, v in inputs(1, length).items()}
        seconds = {name: time_session(path, feeds, args.repeats) for name, path in files.items()}
        rows.append((length, seconds))
        print(f"L={length}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in seconds.items()), flush=True)

    names = list(files)
    print("\n| L | " + " | ".join(f"{n} ms" for n in names) + " | " +
          " | ".join(f"dense / {n}" for n in names if n != "dense") + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for length, s in rows:
        print(f"| {length} | " + " | ".join(f"{s[n] * 1e3:.0f}" for n in names) + " | " +
              " | ".join(f"{s['dense'] / s[n]:.2f}x" for n in names if n != "dense") + " |")


if __name__ == "__main__":
    main()
