"""TARGET: a local Hugging Face model folder or `module:callable`, loaded into (model, args, kwargs)."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from attnpass.tools.cli.errors import CliError, first_line

DEFAULT_LENGTH = 128
# Text the tokenizer of a model folder turns into inputs (repeated up to --length tokens).
SAMPLE_TEXT = (
    "attnpass finds the attention inside a model's graph and rewrites it into sparse attention. "
    "Each method decides which query-key pairs are computed: Combiner reads its own block directly "
    "and the rest through region summaries, routing clusters queries and keys with online k-means, "
    "SBM samples a graph from learned cluster memberships, and Sparsefinder predicts where entmax "
    "is nonzero. A user should see what the pass will do to their model before trusting it. "
)


@dataclasses.dataclass
class Target:
    """A model and one example call of it."""

    name: str
    model: object
    args: tuple
    kwargs: dict
    source: str  # "folder" | "callable"


def load_target(target: str, length: int | None = None, batch: int = 1) -> Target:
    """Resolve TARGET to (model, args, kwargs); CliError(EXIT_USAGE) saying what was wrong."""
    path = Path(target)
    if path.is_dir():
        return _load_folder(path, length or DEFAULT_LENGTH, batch)
    if ":" in target:
        return _load_callable(target)
    if path.exists():
        raise CliError(f"TARGET {target!r} is a file, not a model folder; for Python code use 'file.py:callable'")
    raise CliError(f"TARGET {target!r} is neither an existing model folder nor 'module:callable'")


def _load_folder(path: Path, length: int, batch: int) -> Target:
    if not (path / "config.json").is_file():
        raise CliError(f"TARGET {str(path)!r} is a directory without config.json, so not a Hugging Face model folder")
    if length < 2 or batch < 1:
        raise CliError(f"--length must be >= 2 and --batch >= 1, got length={length}, batch={batch}")
    # a local folder must never reach for the network (and must not hang waiting for it)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(str(path)).eval()
    except Exception as e:  # noqa: BLE001 - any loading failure is a problem with the folder
        raise CliError(f"could not load a model from {str(path)!r} with transformers.AutoModel: "
                       f"{type(e).__name__}: {first_line(e)}") from e
    if getattr(model.config, "use_cache", False):
        # sparsify captures a cache in the outputs, but the commands here (inspect, plot, bench,
        # an ONNX file of the forward) have no use for one; said in the TARGET help
        model.config.use_cache = False
    kwargs = _folder_inputs(path, model, length, batch, torch, transformers)
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = kwargs["input_ids"].clone()
    return Target(type(model).__name__, model, (), kwargs, "folder")


def _folder_inputs(path, model, length, batch, torch, transformers) -> dict:
    """Token ids and attention mask of `batch` rows, `length` wide; row b has b * length / (2 batch)
    padding tokens at the end, so key padding is exercised (row 0 has none)."""
    real = [length - b * (length // (2 * batch)) for b in range(batch)]
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception:  # noqa: BLE001 - fall back to random ids, said in the output
            tokenizer = None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and length > max_pos:
        raise CliError(f"--length {length} is more than the model's max_position_embeddings ({max_pos})")
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        text = SAMPLE_TEXT * (1 + length // 40)
        rows = [tokenizer(text, truncation=True, max_length=n)["input_ids"] for n in real]
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}
    vocab = getattr(model.config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise CliError(f"{str(path)!r} has no usable tokenizer and its config has no vocab_size, so no input "
                       "can be built; give a 'module:callable' that returns (model, args, kwargs)")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < torch.tensor(real).unsqueeze(1)).long()
    return {"input_ids": ids, "attention_mask": mask}


def _load_callable(target: str) -> Target:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"TARGET {target!r}: expected 'module:callable' with both parts")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise CliError(f"TARGET {target!r}: no file {module_name!r}")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except ImportError as e:
        raise CliError(f"TARGET {target!r}: cannot import {module_name!r}: {first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise CliError(f"TARGET {target!r}: importing {module_name!r} raised {type(e).__name__}: {first_line(e)}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise CliError(f"TARGET {target!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise CliError(f"TARGET {target!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the user's callable failed
        raise CliError(f"TARGET {target!r}: calling {attr}() raised {type(e).__name__}: {first_line(e)}") from e
    import torch

    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise CliError(f"TARGET {target!r}: {attr}() must return (model, args, kwargs), "
                       f"got {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
    model, args, kwargs = result
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"TARGET {target!r}: {attr}() returned a {type(model).__name__} as the model, not a torch.nn.Module")
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs or {}, dict):
        raise CliError(f"TARGET {target!r}: {attr}() must return args as a tuple and kwargs as a dict, "
                       f"got {type(args).__name__} and {type(kwargs).__name__}")
    return Target(type(model).__name__, model, tuple(args), dict(kwargs or {}), "callable")


def describe_inputs(t: Target) -> dict[str, list[int] | str]:
    """Input name -> shape (for the header line and --json)."""
    import torch

    out = {}
    for name, value in [(f"args[{i}]", a) for i, a in enumerate(t.args)] + list(t.kwargs.items()):
        out[name] = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    return out
