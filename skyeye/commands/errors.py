"""How every `skyeye` command (and `python -m flows.*`) ends on an error, in one place:

- an error SkyEye raised for the user (its own error classes; a ValueError raised by its
  code, whose message names the input; an OSError, which names its path): `error: ...` on
  stderr, exit 2 for a ValueError (the input is wrong), 1 otherwise;
- anything else: one "internal error" line naming a log file that holds the traceback, exit 1;
- SKYEYE_DEBUG=1 (or `skyeye --debug`): the traceback itself, as Python prints it.

`HandledGroup` puts this around the Typer app, so a new command is covered as it is written.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from typer.core import TyperGroup

from ..config import get_settings
from .console import err_console

DEBUG_ENV = "SKYEYE_DEBUG"
OUR_PACKAGES = ("skyeye", "flows", "__main__")  # `python -m flows.retrain` runs as __main__


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _ours(module: str) -> bool:
    return module.split(".")[0] in OUR_PACKAGES


def _for_the_user(err: Exception) -> bool:
    """A SkyEye error class, or a ValueError raised by SkyEye's own code (its innermost frame)."""
    if _ours(type(err).__module__):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(err, ValueError) and tb is not None and _ours(tb.tb_frame.f_globals.get("__name__", ""))


def _log_traceback(err: BaseException) -> Path:
    """Write the traceback under <state>/logs (a temporary folder if that cannot be written)."""
    text = "".join(traceback.format_exception(err))
    name = f"error-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    try:
        folder = get_settings().state / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        return folder / name
    except Exception:  # the settings or the state folder are what failed
        path = Path(tempfile.gettempdir()) / f"skyeye-{name}"
        path.write_text(text)
        return path


def report(err: Exception) -> int:
    """Print `err` for the person who ran the command; return the exit status."""
    if isinstance(err, OSError) and err.filename is not None:
        message, code = f"{err.filename}: {err.strerror or err}", 1
    elif isinstance(err, OSError) or _for_the_user(err):
        message, code = str(err) or type(err).__name__, 2 if isinstance(err, ValueError) else 1
    else:
        log = _log_traceback(err)
        message, code = (f"internal error: {type(err).__name__}: {err}\n"
                         f"  traceback in {log} (or run again with SKYEYE_DEBUG=1 to see it here)"), 1
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(message, markup=False, highlight=False)
    return code


@contextmanager
def exit_on_error(debug: bool = False) -> Iterator[None]:
    """Around a command's work: an error becomes `report`'s lines and exit status, unless debugging."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # Typer's own: `fail`, Ctrl-C, a usage error; Typer prints and exits
    except Exception as err:
        if debug or debug_requested():
            raise
        sys.exit(report(err))


class HandledGroup(TyperGroup):
    """The root command group: every subcommand runs inside `exit_on_error` (`--debug` lets tracebacks through)."""

    def invoke(self, ctx: typer.Context):
        with exit_on_error(bool(ctx.params.get("debug"))):
            return super().invoke(ctx)
