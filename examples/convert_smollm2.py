"""Convert a pretrained long-context LM to each sparse method, calibrate on one text, measure on another.

    python examples/convert_smollm2.py       # SmolLM2 at L=4096; writes docs/convert_smollm2.md and
                                             # docs/img/convert_smollm2.png

SmolLM2-135M-Instruct (examples/real_models.py). Each recipe (`real_models.RECIPES`) is what README recommends for a
pretrained causal LM: the method plus attention sinks and a local window (`sinks=`, `local=`, see
attnpass/methods/anchor.py), sparsified, calibrated where the method has state to fit
(`attnpass.calibrate` on the "gpl" family of license texts), and measured on the "other" family,
which shares no text with it:

- share of pairs computed: pairs the sites compute directly (Combiner's summary scores and the
  scores routing computes to choose its keys included) over the pairs the causal rule allows,
  summed over every layer and head of the perplexity forward, counted as `attnpass.fidelity`
  counts them (site_probe.counted_pairs, one site call at a time);
- perplexity over the first L tokens of that text (one forward);
- pass keys: 10 prompts of L tokens with a 5-digit key at depths spread over 0.1-0.9 (retrieved when
  every answer token is the argmax in one teacher-forced forward), counted against the original's;
- forward time of the converted model over the original's, the same call timed in this run
  (median of `--repeats` calls each, after one warm-up call).

The oracle and sinks + local curves of the PNG are read from docs/quality_reference.md, which
examples/reference_curves.py writes (same model, text and measures).
"""
from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import (EVALUATION_FAMILY, RECIPES, convert, load_smollm2, long_text, pass_key_prompt,  # noqa: E402
                         perplexity, retrieves)

from attnpass.tools.site_probe import counted_pairs  # noqa: E402

REFERENCE_DOC = Path("docs/quality_reference.md")


class PairCounter:
    """Counts, over every site call of a sparsified model, the pairs computed and the pairs allowed."""

    def __init__(self, model):
        self.computed = self.allowed = 0
        self.handles = [m.register_forward_hook(self._count, with_kwargs=True) for m in model.site_modules().values()]

    def _count(self, module, args, kwargs, out):
        names = ("q", "k", "v", "bias", "mask", "key_keep")
        inputs = {**dict(zip(names, args)), **{n: kwargs[n] for n in names if n in kwargs}}
        with torch.no_grad():
            _, allowed, computed = counted_pairs(module, inputs)
        self.computed += computed
        self.allowed += int(allowed.sum())

    def close(self) -> float:
        for handle in self.handles:
            handle.remove()
        return self.computed / max(self.allowed, 1)


def forward_seconds(model, ids, repeats: int) -> float:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_points() -> dict[str, list[tuple[float, float]]]:
    """{"oracle": [(share, perplexity change %)], "sinks_local (s=4)": [...]} from docs/quality_reference.md."""
    curves: dict[str, list[tuple[float, float]]] = {}
    if not REFERENCE_DOC.is_file():
        return curves
    for line in REFERENCE_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] not in ("oracle", "sinks_local") or not cells[3].endswith("%"):
            continue
        name = "oracle" if cells[0] == "oracle" else f"sinks + local (s={cells[1]})"
        curves.setdefault(name, []).append((float(cells[3].rstrip("%")) / 100, float(cells[6].rstrip("%"))))
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--time-lengths", type=int, nargs="*", default=[4096, 8192],
                        help="lengths at which forward time is compared with the original's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=[r[0] for r in RECIPES], help="recipes to run, in this order")
    parser.add_argument("--out", default="docs/convert_smollm2.md", help="markdown file ('' for none)")
    parser.add_argument("--png", default="docs/img/convert_smollm2.png", help="plot file ('' for none)")
    argv = sys.argv[1:] if argv is None else argv  # the report names the command as given
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    ids = long_text(tokenizer, args.length, EVALUATION_FAMILY)
    text = long_text(tokenizer, max(args.time_lengths + [args.length]), EVALUATION_FAMILY)
    rng = random.Random(21)
    keys = [rng.randrange(10000, 100000) for _ in range(args.keys)]
    depths = [0.1 + 0.8 * i / max(args.keys - 1, 1) for i in range(args.keys)]
    answer_len = len(tokenizer(f" {keys[0]}", add_special_tokens=False)["input_ids"])
    prompts = [pass_key_prompt(tokenizer, args.length - answer_len, d, key, EVALUATION_FAMILY)
               for key, d in zip(keys, depths)]

    def pass_keys(m) -> set[int]:
        return {i for i, (p, key) in enumerate(zip(prompts, keys)) if retrieves(m, tokenizer, p, key)}

    base_ppl = perplexity(model, ids)
    base_keys = pass_keys(model)
    base_time = {n: forward_seconds(model, text[:, :n], args.repeats) for n in args.time_lengths}
    log(f"original: perplexity {base_ppl:.3f}, pass keys {sorted(base_keys)}, forward "
        + ", ".join(f"{t:.2f} s at {n}" for n, t in base_time.items()))
    rows = []
    recipes = {r[0]: r for r in RECIPES}
    unknown = sorted(set(args.methods) - set(recipes))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {sorted(recipes)}")
    for label, method, options, calibrate in (recipes[name] for name in args.methods):
        sparse, calibrate_s = convert(model, tokenizer, label, dict(input_ids=ids[:, :64], use_cache=False))
        if calibrate_s is not None:
            log(f"{label}: calibrated in {calibrate_s:.0f} s")
        counter = PairCounter(sparse)
        ppl = perplexity(sparse, ids)
        share = counter.close()
        # each measure is logged as it lands: a slow method's run shows what it has measured so far
        log(f"{label}: share {share:.4f}, perplexity {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.1f}%)")
        found = pass_keys(sparse)
        log(f"{label}: pass keys {sorted(found)}")
        speed = {n: base_time[n] / forward_seconds(sparse, text[:, :n], args.repeats) for n in args.time_lengths}
        rows.append(dict(label=label, method=method, options=options, calibrate=calibrate, calibrate_s=calibrate_s,
                         share=share, ppl=ppl, keys=found, speed=speed))
        log(f"{label}: speed " + ", ".join(f"{s:.2f}x at {n}" for n, s in speed.items()))
        del sparse
        # written after every method, so a long run leaves what it has measured
        table = _table(rows, base_ppl, base_keys, args)
        if args.out:
            Path(args.out).write_text(_doc(table, args, argv, base_ppl, base_keys, base_time, time.perf_counter() - started))
        if args.png:
            _plot(rows, base_ppl, args.png)
    print(_table(rows, base_ppl, base_keys, args))
    log(f"wrote {args.out or '-'} and {args.png or '-'}")


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _table(rows, base_ppl, base_keys, args) -> str:
    times = " | ".join(f"speed at {n}" for n in args.time_lengths)
    lines = [f"| method | options | calibrated | share of pairs | perplexity | vs original | pass keys (of {args.keys}) "
             f"| lost vs original | {times} |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(args.time_lengths)]
    for r in rows:
        calibrated = "-" if r["calibrate"] is None else f"{r['calibrate']['steps']} steps, {r['calibrate_s']:.0f} s"
        speed = " | ".join(f"{r['speed'][n]:.2f}x" for n in args.time_lengths)
        lines.append(f"| {r['method']} | {_options_text(r['options'])} | {calibrated} | {100 * r['share']:.1f}% | "
                     f"{r['ppl']:.3f} | {100 * (r['ppl'] / base_ppl - 1):+.1f}% | {len(r['keys'])} | "
                     f"{len(base_keys - r['keys'])} | {speed} |")
    return "\n".join(lines)


def _doc(table, args, argv, base_ppl, base_keys, base_time, runtime) -> str:
    doc = __doc__.split("\n\n", 2)[2].strip()
    original = ", ".join(f"{t:.2f} s at L={n}" for n, t in base_time.items())
    return f"""# Converting SmolLM2 to each sparse method: quality, pairs and speed

Produced by `{shlex.join(['python', 'examples/convert_smollm2.py', *argv])}`: {runtime / 60:.0f} min in total on this machine's 2 cores.

{doc}

The original: perplexity {base_ppl:.3f}, {len(base_keys)} of {args.keys} pass keys, forward {original}.
"Speed" is the original's forward time over the converted model's (above 1: faster).

{table}
""" + (f"\n![perplexity vs share of pairs](img/{Path(args.png).name})\n" if args.png else "")


def _plot(rows, base_ppl, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in reference_points().items():
        points.sort()
        ax.plot([100 * s for s, _ in points], [p for _, p in points], "--o", label=name, alpha=0.7)
    for r in rows:
        ax.plot(100 * r["share"], 100 * (r["ppl"] / base_ppl - 1), "s", markersize=8, label=f"{r['label']} (recipe)")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("pairs computed, % of the causal pairs")
    ax.set_ylabel("perplexity change vs original, %")
    ax.set_title("SmolLM2-135M-Instruct, L=4096, held-out text")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
