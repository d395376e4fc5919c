"""How the `skyeye` commands print: library-rendered text as is, errors in red with exit
code 2, and SIGTERM turned into Ctrl-C for commands that stay in the foreground."""
from __future__ import annotations

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # never wrap paths and ids: people copy them


def say(text: str) -> None:
    """Print library-rendered text as is (it may hold [task] identifiers, not markup)."""
    console.print(text, markup=False, highlight=False)


def fail(message: str) -> None:
    console.print("[bold red]error:[/] ", end="")
    say(message)
    raise typer.Exit(2)


def interrupt(*_) -> None:
    raise KeyboardInterrupt
