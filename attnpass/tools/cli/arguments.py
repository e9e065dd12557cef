"""Method names and method options on the command line: --method, --opt KEY=VALUE or METHOD.KEY=VALUE."""
from __future__ import annotations

import ast

from attnpass.tools.cli.errors import CliError


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
