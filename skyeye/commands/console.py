"""How the `skyeye` commands print: library-rendered text as is, errors in red on stderr with
exit code 2, and SIGTERM turned into Ctrl-C for commands that stay in the foreground.
Errors nobody caught are reported by `errors.py`."""
from __future__ import annotations

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # never wrap paths and ids: people copy them
err_console = Console(soft_wrap=True, stderr=True)


def say(text: str) -> None:
    """Print library-rendered text as is (it may hold [task] identifiers, not markup)."""
    console.print(text, markup=False, highlight=False)


def fail(message: str) -> None:
    """The input named in `message` is wrong: say so on stderr and exit 2."""
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(message, markup=False, highlight=False)
    raise typer.Exit(2)


def interrupt(*_) -> None:
    raise KeyboardInterrupt
