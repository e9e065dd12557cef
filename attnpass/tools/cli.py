"""The `attnpass` command line: see what the pass will do to a model before trusting it.

    attnpass inspect TARGET [--method M] [--length N]    sites table + sympy cost per site
    attnpass plot TARGET --method M --out DIR           PNG: pairs each method computes vs dense attention
    attnpass bench [--lengths 256,1024] [--methods ...] quick one-layer speed suite, ratio table
    attnpass export TARGET --method M -o model.onnx     ONNX file onnxruntime runs (exit 4: method not exportable)

TARGET is a local Hugging Face model folder (loaded offline with transformers' AutoModel, inputs
from its tokenizer at `--length` x `--batch`, random token ids when it has none), or
`module:callable` (`file.py:callable` also works) whose callable, called with no arguments,
returns `(model, args, kwargs)`; the current directory is on sys.path for the import.

Output is a plain fixed-width table, or a rich table when rich is installed and stdout is a
terminal; `--json` prints one JSON document for machines. Errors are one line on stderr (the
traceback only with `--debug`), and the exit code says what kind of failure it was (see `EXIT_*`).
"""
from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

# Exit codes: argparse already uses 2 for bad usage; bad input (TARGET, options) shares it.
EXIT_OK = 0
EXIT_ERROR = 1        # an unexpected failure inside attnpass (a bug: please report it with --debug)
EXIT_USAGE = 2        # bad command line or input: TARGET, options, method names, lengths
EXIT_CAPTURE = 3      # the model could not be captured, or holds no attention the command can use
EXIT_UNAVAILABLE = 4  # the feature is not available in this version (ONNX export)

DEFAULT_LENGTH = 128
# Text the tokenizer of a model folder turns into inputs (repeated up to --length tokens).
SAMPLE_TEXT = (
    "attnpass finds the attention inside a model's graph and rewrites it into sparse attention. "
    "Each method decides which query-key pairs are computed: Combiner reads its own block directly "
    "and the rest through region summaries, routing clusters queries and keys with online k-means, "
    "SBM samples a graph from learned cluster memberships, and Sparsefinder predicts where entmax "
    "is nonzero. A user should see what the pass will do to their model before trusting it. "
)


class CliError(Exception):
    """An error the command line reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# TARGET: a model folder or module:callable
# --------------------------------------------------------------------------------------------


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
                       f"{type(e).__name__}: {_first_line(e)}") from e
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
        raise CliError(f"TARGET {target!r}: cannot import {module_name!r}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise CliError(f"TARGET {target!r}: importing {module_name!r} raised {type(e).__name__}: {_first_line(e)}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise CliError(f"TARGET {target!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise CliError(f"TARGET {target!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the user's callable failed
        raise CliError(f"TARGET {target!r}: calling {attr}() raised {type(e).__name__}: {_first_line(e)}") from e
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


# --------------------------------------------------------------------------------------------
# Method options: --opt KEY=VALUE or --opt METHOD.KEY=VALUE
# --------------------------------------------------------------------------------------------


def parse_methods(text: str | list[str] | None, default: list[str]) -> list[str]:
    """Comma-separated / repeated method names, checked against attnpass.METHODS."""
    from attnpass.methods import METHODS

    if not text:
        return list(default)
    parts = text if isinstance(text, list) else [text]
    names = [m.strip().lower() for p in parts for m in p.split(",") if m.strip()]
    if names == ["all"]:
        return list(default)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise CliError(f"unknown method(s) {unknown}; available: {list(METHODS)}")
    return list(dict.fromkeys(names))


def parse_options(items: list[str] | None) -> dict[str | None, dict]:
    """`KEY=VALUE` (every method) and `METHOD.KEY=VALUE` (that method) -> {method or None: {key: value}}.

    Values are Python literals (`4`, `0.5`, `None`, `True`); anything else is a string (`fixed`).
    """
    out: dict[str | None, dict] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--opt {item!r}: expected KEY=VALUE or METHOD.KEY=VALUE")
        method, _, name = key.rpartition(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(method.lower() or None, {})[name] = value
    return out


def options_for(method: str, options: dict[str | None, dict]) -> dict:
    return {**options.get(None, {}), **options.get(method, {})}


def check_method_options(method: str, opts: dict) -> None:
    """The method's own option check (before any capture), as a usage error."""
    from attnpass.methods import method_class

    try:
        method_class(method).validate_options(**opts)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from e


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def use_rich(args) -> bool:
    if getattr(args, "plain", False) or getattr(args, "json", False):
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return sys.stdout.isatty()


def print_table(rows: list[dict[str, str]], title: str | None = None, rich_out: bool = False) -> None:
    """A table of string cells: rich's when asked (and installed), else attnpass's plain one."""
    from attnpass.frontend.site import format_table

    if not rows:
        return
    if rich_out:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_lines=False)
        for col in rows[0]:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*r.values())
        Console().print(table)
        return
    if title:
        print(title)
    print(format_table(rows))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _example_batch(target) -> int | None:
    """The leading size of the example's first tensor input, if it has one."""
    import torch
    import torch.utils._pytree  # noqa: F401

    first = next((t for t in torch.utils._pytree.tree_leaves((target.args, target.kwargs))
                  if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _example_dims(site, length: int | None, batch: int | None) -> dict:
    """The site's dims as ints for the cost numbers: concrete ones as they are, symbolic lengths at
    --length (when given) else at the example call's value, symbolic batch at the example's."""
    from attnpass.api import example_int

    def dim(value, override):
        if isinstance(value, int):
            return value
        return override if override is not None else example_int(value)

    return {"batch": dim(site.batch, batch), "len_q": dim(site.len_q, length), "len_k": dim(site.len_k, length)}


def site_cost(site, method: str, opts: dict, length: int | None, batch: int | None) -> dict:
    """Dense and `method` cost of one site: formulas (the site's symbolic dims kept) and numbers."""
    from attnpass import cost_model

    cost_opts = {k: v for k, v in opts.items() if k in cost_model.cost_options(method)}
    out = {"method": method, "options": cost_opts}
    if method not in cost_model.METHODS:
        out["error"] = f"no cost model for method {method!r} (cost models: {list(cost_model.METHODS)})"
        return out
    dense = cost_model.cost(site, "dense")
    sparse = cost_model.cost(site, method, **cost_opts)
    out["dense_formula"] = {"flops": str(dense.flops), "bytes": str(dense.bytes)}
    out["formula"] = {"flops": str(sparse.flops), "bytes": str(sparse.bytes), "text": str(sparse)}
    dims = _example_dims(site, length, batch)
    out["at"] = {"B": dims["batch"], "Lq": dims["len_q"], "Lk": dims["len_k"]}
    if None in dims.values():
        out["numbers_error"] = "the site's batch or lengths are unknown"
        return out
    concrete = dataclasses.replace(site, batch=dims["batch"], len_q=dims["len_q"], len_k=dims["len_k"])
    dense_n = cost_model.cost(concrete, "dense")
    sparse_n = cost_model.cost(concrete, method, **cost_opts)
    out["params"] = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in sparse_n.params.items()}
    try:
        d_flops, d_bytes = dense_n.evaluate()
        s_flops, s_bytes = sparse_n.evaluate()
    except ValueError as e:
        from attnpass.methods import method_class

        learned = " (its graph density is learned: pass --opt density=RHO)" if method_class(method).learns_density else ""
        out["numbers_error"] = str(e) + learned
        return out
    out["numbers"] = {"dense_flops": d_flops, "flops": s_flops, "dense_bytes": d_bytes, "bytes": s_bytes,
                      "flops_ratio": d_flops / s_flops, "bytes_ratio": d_bytes / s_bytes}
    return out


def method_status(site, method: str, opts: dict) -> str | None:
    """Why `method` would decline this site (sparsify leaves it unchanged), or None."""
    from attnpass.api import site_spec
    from attnpass.methods import method_class

    return method_class(method).unsupported_reason(site_spec(site), **opts)


def _num(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def cmd_inspect(args) -> int:
    import attnpass

    method = parse_methods(args.method, ["routing"])
    if len(method) != 1:
        raise CliError(f"inspect takes one --method, got {method}")
    method = method[0]
    opts = options_for(method, parse_options(args.opt))
    from attnpass import cost_model

    # an option is the method's (checked by its class) or the cost model's (e.g. SBM's learned density)
    method_keys, cost_keys = _method_keys(method), set(cost_model.cost_options(method))
    unknown = sorted(set(opts) - method_keys - cost_keys)
    if unknown:
        raise CliError(f"method {method!r} got unknown option(s) {unknown}; it takes {sorted(method_keys | cost_keys)}")
    method_opts = {k: v for k, v in opts.items() if k in method_keys}
    check_method_options(method, method_opts)
    target = load_target(args.target, args.length, args.batch)
    report = attnpass.find_attention(target.model, target.args, target.kwargs)
    length = args.length if target.source == "callable" else None  # folders: already built at --length
    sites = []
    for site in report.sites:
        entry = dict(site.row())
        entry["declined"] = method_status(site, method, method_opts)
        # the example's batch (a batch-1 example is captured at batch 2, which the site's hint shows)
        entry["cost"] = site_cost(site, method, opts, length, _example_batch(target))
        sites.append(entry)
    doc = {"target": args.target, "model": report.model_name, "inputs": describe_inputs(target),
           "method": method, "options": opts, "sites": sites, "skipped": [s.row() for s in report.skipped]}
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_inspect(doc, use_rich(args))
    # the report is printed either way; the exit code says whether the method would rewrite anything
    if not any(entry["declined"] is None for entry in sites):
        why = "no attention found" if not sites else f"method {method!r} declines every site"
        print(f"attnpass inspect: error: {why}", file=sys.stderr)
        return EXIT_CAPTURE
    return EXIT_OK


def _method_keys(method: str) -> set[str]:
    """Option names the method's module accepts (from its class; empty if it takes none)."""
    from attnpass.methods import method_class

    return set(method_class(method).options)


def _print_inspect(doc: dict, rich_out: bool) -> None:
    inputs = ", ".join(f"{k} {tuple(v) if isinstance(v, list) else v}" for k, v in doc["inputs"].items())
    print(f"{doc['model']} ({doc['target']}), inputs: {inputs}")
    sites, skipped = doc["sites"], doc["skipped"]
    if not sites and not skipped:
        print("no attention found (no softmax(Q K^T) V or scaled_dot_product_attention in the captured graph)")
        return
    table_cols = [k for k in sites[0] if k not in ("declined", "cost")] if sites else []
    print_table([{c: s[c] for c in table_cols} for s in sites],
                f"{len(sites)} attention site(s)" + (f", {len(skipped)} skipped" if skipped else ""), rich_out)
    if skipped:
        print_table(skipped, "skipped (left unchanged):", rich_out)
    if not sites:
        return
    method = doc["method"]
    print()
    rows, formulas = [], {}
    for s in sites:
        c = s["cost"]
        row = {"site": s["site"]}
        if "error" in c:
            row["cost"] = c["error"]
        elif "numbers" in c:
            n = c["numbers"]
            row.update({"B x Lq x Lk": f"{c['at']['B']} x {c['at']['Lq']} x {c['at']['Lk']}",
                        "params": ", ".join(f"{k}={v}" for k, v in c["params"].items()) or "-",
                        f"FLOPs dense -> {method}": f"{_num(n['dense_flops'])} -> {_num(n['flops'])} "
                                                    f"({n['flops_ratio']:.2f}x fewer)",
                        f"bytes dense -> {method}": f"{_num(n['dense_bytes'])} -> {_num(n['bytes'])} "
                                                    f"({n['bytes_ratio']:.2f}x fewer)"})
        else:
            row["cost"] = c.get("numbers_error", "")
        row[f"{method}"] = f"declined: {s['declined']}" if s["declined"] else "rewritten"
        rows.append(row)
        if "formula" in c:
            key = (c["dense_formula"]["flops"], c["dense_formula"]["bytes"], c["formula"]["flops"], c["formula"]["bytes"])
            formulas.setdefault(key, []).append(s["site"])
    # rows may differ in columns (a site without numbers): pad so the table stays rectangular
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table([{k: r.get(k, "") for k in cols} for r in rows],
                f"cost per site, method={method} (sympy cost model, evaluated at the lengths shown)",
                rich_out)
    if not formulas:
        return
    from attnpass import cost_model

    legend = cost_model.symbol_legend(method)
    print(f"\nformulas (sympy; B batch, L_q / L_k lengths when symbolic{', ' + legend if legend else ''}):")
    w = max(len("dense"), len(method))
    for (d_flops, d_bytes, s_flops, s_bytes), names in formulas.items():
        where = names[0] if len(names) == 1 else f"{len(names)} sites ({names[0]} ...)"
        print(f"  {where}:")
        for name, flops, nbytes in (("dense", d_flops, d_bytes), (method, s_flops, s_bytes)):
            print(f"    {name:<{w}}  flops {flops}\n    {'':<{w}}  bytes {nbytes}")


# --------------------------------------------------------------------------------------------
# export, plot, bench
# --------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    import attnpass

    method = parse_methods(args.method, ["dense"])  # a bad method name is still a usage error
    if len(method) != 1:
        raise CliError(f"export takes one --method, got {method}")
    method = method[0]
    opts = options_for(method, parse_options(args.opt))
    target = load_target(args.target, batch=2)  # folders: batch 2, so export keeps the batch axis dynamic
    try:
        proto = attnpass.export_onnx(target.model, target.args, target.kwargs, f=args.output, method=method, **opts)
    except NotImplementedError as e:  # a method (or variant) without an ONNX lowering yet
        raise CliError(f"{_first_line(e)}; nothing was written", EXIT_UNAVAILABLE) from e
    nodes = collections.Counter(n.op_type for n in proto.graph.node if n.domain == "attnpass")
    print(f"wrote {args.output}: {target.name}, method {method}, "
          + ", ".join(f"{count} attnpass.{op} node(s)" for op, count in sorted(nodes.items())))
    return EXIT_OK


def cmd_plot(args) -> int:
    from attnpass.tools import cli_plot

    return cli_plot.run(args)


def cmd_bench(args) -> int:
    from attnpass.tools import cli_bench

    return cli_bench.run(args)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpass", description="See what attnpass will do to a model: its attention sites, their cost, "
        "the pairs each sparse method computes, and the speed of the methods.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad usage or input, 3 model not captured / no attention, "
               "4 not available in this version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, target=True):
        if target:
            p.add_argument("target", metavar="TARGET",
                           help="a local Hugging Face model folder (called with use_cache=False: these commands "
                                "have no use for a KV cache), or module:callable returning (model, args, kwargs)")
            p.add_argument("--length", type=int, default=None,
                           help=f"sequence length: of the inputs built for a model folder (default {DEFAULT_LENGTH})"
                                "; for module:callable only where the command says so")
            p.add_argument("--batch", type=int, default=1, help="batch of the inputs built for a model folder (default 1)")
        p.add_argument("--opt", action="append", metavar="[METHOD.]KEY=VALUE",
                       help="a method option, e.g. clusters=8 or combiner.block=16 (repeatable)")
        p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
        p.add_argument("--plain", action="store_true", help="plain tables even on a terminal")
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    p = sub.add_parser("inspect", help="attention sites and the sympy cost per site for one method")
    common(p)
    p.add_argument("--method", default="routing", help="method to cost (default routing)")
    p.epilog = "For module:callable, --length sets the length the cost numbers are evaluated at (default: the example's)."
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plot", help="PNG heatmaps: the pairs each method computes beside the dense attention")
    common(p)
    p.add_argument("--method", action="append", help="method(s), comma-separated or repeated "
                   "(default: every sparse method)")
    p.add_argument("--out", required=True, help="directory for the PNG files (created if missing)")
    p.add_argument("--site", default=None, help="site name or index in the inspect table (default: the first)")
    p.add_argument("--head", type=int, default=0, help="query head (default 0)")
    p.add_argument("--row", type=int, default=0, help="batch row (default 0)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the methods' initial state (default 0)")
    p.add_argument("--dpi", type=int, default=100, help="image resolution (default 100: 1100 x 500 pixels)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="quick speed suite: one attention layer, SDPA vs each method's forward")
    common(p, target=False)
    p.add_argument("--lengths", default="256,1024", help="comma-separated sequence lengths (default 256,1024)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every method)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point; the median is reported (default 3)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export to ONNX (attnpass custom ops with standard-op bodies)")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--method", default="dense")
    p.add_argument("-o", "--output", default="model.onnx")
    p.add_argument("--opt", action="append", metavar="[METHOD.]KEY=VALUE")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's message on bad usage
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        if args.debug:
            raise
        code, message = _classify(e)
        print(f"attnpass {args.command}: error: {message}", file=sys.stderr)
        return code


def _quiet_libraries() -> None:
    """Keep the terminal to attnpass's own output: torch.export's shape notes ("dimension ... specialized")
    and transformers' weight-loading bar are noise here (--debug shows them)."""
    import logging

    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("torch.export").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _classify(e: Exception) -> tuple[int, str]:
    from attnpass import CaptureError, NoAttentionFound

    if isinstance(e, CliError):
        return e.code, " ".join(str(e).split())
    if isinstance(e, (CaptureError, NoAttentionFound)):
        return EXIT_CAPTURE, " ".join(str(e).split())
    if isinstance(e, (TypeError, ValueError)):
        # attnpass's own input checks (check_call_inputs, method options) raise these with clear text
        return EXIT_USAGE, f"{type(e).__name__}: {_first_line(e)}"
    return EXIT_ERROR, f"{type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)"


if __name__ == "__main__":
    # `python -m attnpass.tools.cli`: run the imported module's main, so cli_plot / cli_bench and this
    # entry point share one CliError class
    from attnpass.tools.cli import main as _main

    sys.exit(_main())
