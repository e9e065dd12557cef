"""Tables: rich's on a terminal (when installed), else a plain fixed-width one."""
from __future__ import annotations

import sys


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
