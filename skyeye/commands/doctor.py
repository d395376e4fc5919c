"""`skyeye doctor`: the backend of each part, whether it answers, and what to set when not."""
from __future__ import annotations

# imports inside functions: doctor.checks (httpx, the backends' clients) and rich's tables load when the
# command runs, not at `skyeye --help`
import json
from typing import Annotated

import typer

from .console import console, say


def doctor(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Which backend each part uses (tracking, orchestration, compute, checkpoints, data versions),
    whether it answers, and what to set when it does not. Exit code 1 when one fails."""
    from rich.table import Table

    from ..doctor.checks import run_checks
    checks = run_checks()
    if json_out:
        say(json.dumps([c.as_dict() for c in checks], indent=1))
    else:
        table = Table(show_lines=False)
        for column in ("part", "backend", "", "detail"):
            table.add_column(column, overflow="fold")
        for c in checks:
            table.add_row(c.part, c.backend, "[green]ok[/]" if c.ok else "[red]FAIL[/]",
                          c.detail + (f"\n[yellow]-> {c.hint}[/]" if c.hint else ""))
        console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
