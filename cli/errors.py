"""How every command reports a user error: one red line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import typer


def fail(e: Exception):
    from rich.console import Console
    from rich.markup import escape

    # escape(): paths and messages are text, not markup ("[raw]" would vanish, "[/raw]" would raise)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2) from None
