"""How long `find_attention` takes on a 12-layer BERT-base-sized model (random weights).

    python benchmarks/find_attention_bert_base.py [--impl eager|sdpa]

Target (issue: foundation): under 60 s on a 2-core CPU machine. Prints the time of each step.
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import attnpass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--length", type=int, default=128)
    opts = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.BertConfig(attn_implementation=opts.impl)  # defaults are BERT-base: 12 layers, 768 hidden, 12 heads
    start = time.perf_counter()
    model = transformers.BertModel(config).eval()
    built = time.perf_counter() - start
    ids = torch.randint(0, config.vocab_size, (2, opts.length))
    mask = torch.ones_like(ids)
    mask[1, opts.length // 2:] = 0
    start = time.perf_counter()
    report = attnpass.find_attention(model, kwargs={"input_ids": ids, "attention_mask": mask})
    found = time.perf_counter() - start
    print(f"BERT-base ({opts.impl}), build {built:.1f} s; find_attention: {len(report.sites)} sites, "
          f"{len(report.skipped)} skipped, {found:.1f} s (target < 60 s)")


if __name__ == "__main__":
    main()
