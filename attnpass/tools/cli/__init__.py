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
import os
import sys

from attnpass.tools.cli.arguments import check_method_options, options_for, parse_methods, parse_options
from attnpass.tools.cli.errors import (EXIT_CAPTURE, EXIT_ERROR, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, CliError,
                                      first_line)
from attnpass.tools.cli.output import print_table, use_rich
from attnpass.tools.cli.targets import DEFAULT_LENGTH, Target, describe_inputs, load_target


def cmd_inspect(args) -> int:
    from attnpass.tools.cli.inspect import cmd_inspect as run

    return run(args)


def cmd_export(args) -> int:
    from attnpass.tools.cli.export import cmd_export as run

    return run(args)


def cmd_plot(args) -> int:
    from attnpass.tools.cli import plot

    return plot.run(args)


def cmd_bench(args) -> int:
    from attnpass.tools.cli import bench

    return bench.run(args)


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
        return EXIT_USAGE, f"{type(e).__name__}: {first_line(e)}"
    return EXIT_ERROR, f"{type(e).__name__}: {first_line(e)} (run with --debug for the traceback)"


__all__ = ["CliError", "DEFAULT_LENGTH", "EXIT_CAPTURE", "EXIT_ERROR", "EXIT_OK", "EXIT_UNAVAILABLE", "EXIT_USAGE",
           "Target", "build_parser", "check_method_options", "describe_inputs", "load_target", "main", "options_for",
           "parse_methods", "parse_options", "print_table", "use_rich"]
