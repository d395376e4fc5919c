"""`skyeye log tail|stats`: the inference log of `skyeye serve` (Parquet by day under
SKYEYE_INFERENCE_LOG; `skyeye.monitoring.log_schema` reads it), looked at from a terminal."""
from __future__ import annotations

# imports inside functions: pandas and pyarrow load when a command runs, not at `skyeye --help`
import json
from datetime import UTC, datetime
from typing import Annotated, Optional

import typer

from .console import console, fail, say
from .inputs import in_range

log_app = typer.Typer(help="The inference log of `skyeye serve`: one row per answered or refused request "
                           "(SKYEYE_INFERENCE_LOG, default .skyeye/inference_log).",
                      no_args_is_help=True, rich_markup_mode=None)

PERCENTILES = (50, 90, 99)
TAIL_COLUMNS = ("time", "version", "role", "task", "status", "latency_ms", "completion_tokens", "prompt", "answer",
                "error")


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r}: not an ISO time (e.g. 2026-12-06 or 2026-12-06T18:00:00Z)")
    return t if t.tzinfo else t.replace(tzinfo=UTC)  # a time without a zone is UTC, as the log's


def _read(since: datetime | None = None):
    from ..config import get_settings
    from ..monitoring.log_schema import read_log
    store = get_settings().inference_log_store
    try:
        return store, read_log(store, since=since)
    except (OSError, ValueError) as err:
        fail(f"the inference log at {store} cannot be read: {err}")


def _cell(value, width: int = 48) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{value:.0f}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


@log_app.command("tail")
def tail(n: Annotated[int, typer.Option("-n", callback=in_range(1), help="Rows to show.")] = 20) -> None:
    """The last N requests, oldest first: time (UTC), version, role, task, status, latency, answer."""
    from rich.table import Table
    from rich.text import Text
    store, rows = _read()
    if rows.empty:
        say(f"no requests logged in {store}")
        return
    table = Table(title=f"the last {min(n, len(rows))} of {len(rows)} requests in {store}")
    for col in TAIL_COLUMNS:
        table.add_column(col, overflow="fold", justify="right" if col in ("version", "status", "latency_ms",
                                                                          "completion_tokens") else "left")
    for row in rows.tail(n).to_dict("records"):
        table.add_row(*(Text(_cell(row[c])) for c in TAIL_COLUMNS))  # Text: a "[refer]" is not markup
    console.print(table, markup=False, highlight=False)


def summarize(rows) -> dict:
    """Requests per version, task and status, and latency percentiles (ms) per version and overall."""
    import numpy as np

    def pct(series) -> dict[str, float | None]:
        values = series.dropna().to_numpy()
        return {f"p{p}": (round(float(np.percentile(values, p)), 1) if len(values) else None) for p in PERCENTILES}

    keys = rows[["version", "task", "status"]].astype(object).where(rows[["version", "task", "status"]].notna(), None)
    counts = keys.value_counts(dropna=False).reset_index(name="requests")
    return {"requests": len(rows),
            "since": rows["time"].min().isoformat() if len(rows) else None,
            "until": rows["time"].max().isoformat() if len(rows) else None,
            "by_version_task_status": [{"version": _plain(r["version"]), "task": r["task"],
                                        "status": _plain(r["status"]), "requests": int(r["requests"])}
                                       for r in counts.sort_values(["requests"], ascending=False, kind="stable")
                                       .to_dict("records")],
            "latency_ms": {"all": pct(rows["latency_ms"]),
                           **{str(_plain(v)): pct(group["latency_ms"])
                              for v, group in rows.groupby("version", dropna=False)}}}


def _plain(value):
    return None if value is None or value != value else int(value)


@log_app.command("stats")
def stats(
    since: Annotated[Optional[str], typer.Option(help="Only requests at or after this ISO time (UTC if no zone).")
                     ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Requests per version, task and status; latency p50/p90/p99 per version."""
    store, rows = _read(_since(since))
    out = summarize(rows)
    if json_out:
        say(json.dumps(out, indent=1))
        return
    if not out["requests"]:
        say(f"no requests logged in {store}" + (f" since {since}" if since else ""))
        return
    lines = [f"{out['requests']} requests from {out['since']} to {out['until']} ({store})",
             f"{'version':>8} {'task':<10} {'status':>6} {'requests':>9}"]
    lines += [f"{_cell(r['version']):>8} {_cell(r['task']):<10} {_cell(r['status']):>6} {r['requests']:>9}"
              for r in out["by_version_task_status"]]
    lines.append(f"{'latency ms':<12}" + "".join(f"{f'p{p}':>10}" for p in PERCENTILES))
    lines += [f"{('version ' + v) if v != 'all' else 'all':<12}" + "".join(f"{_cell(q[f'p{p}']):>10}"
                                                                            for p in PERCENTILES)
              for v, q in out["latency_ms"].items()]
    say("\n".join(lines))
