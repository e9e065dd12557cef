"""`attnpass export`: an ONNX file onnxruntime runs."""
from __future__ import annotations

import collections

from attnpass.tools.cli.arguments import options_for, parse_methods, parse_options
from attnpass.tools.cli.errors import EXIT_OK, EXIT_UNAVAILABLE, CliError, first_line
from attnpass.tools.cli.targets import load_target


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
        raise CliError(f"{first_line(e)}; nothing was written", EXIT_UNAVAILABLE) from e
    nodes = collections.Counter(n.op_type for n in proto.graph.node if n.domain == "attnpass")
    print(f"wrote {args.output}: {target.name}, method {method}, "
          + ", ".join(f"{count} attnpass.{op} node(s)" for op, count in sorted(nodes.items())))
    return EXIT_OK
