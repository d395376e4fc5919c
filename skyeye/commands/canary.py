"""`skyeye canary report`: the candidate served beside production (canary or shadow,
skyeye/serving/router.py) against production, on the inference log (`monitoring.canary`),
with the verdict of the promotion policy's canary tolerances (configs/promotion.yaml)."""
from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Optional

import typer

from .console import fail, say
from .inputs import in_range

canary_app = typer.Typer(help="Canary and shadow: a candidate version served beside production, compared on the "
                              "inference log.", no_args_is_help=True, rich_markup_mode=None)
DURATION = re.compile(r"(\d+(?:\.\d+)?)([mhd])")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`90m`, `24h`, `7d` (that long ago) or an ISO date/time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    if m := DURATION.fullmatch(text.strip()):
        return now - timedelta(**{UNITS[m[2]]: float(m[1])})
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration (90m, 24h, 7d) or an ISO date/time "
                         "(2026-12-01 or 2026-12-01T08:00)") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@canary_app.command("report")
def report(
    since: Annotated[Optional[str], typer.Option(
        help="Rows since then: a duration (24h, 7d) or an ISO date/time (default: the policy's "
             "canary.window_days).")] = None,
    candidate: Annotated[Optional[int], typer.Option(
        callback=in_range(1), help="Candidate version (default: the latest that answered as candidate or shadow).")
    ] = None,
    production: Annotated[Optional[int], typer.Option(
        callback=in_range(1), help="Production version (default: the one that answered most as production).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare the candidate with production on the logged traffic: error rate, latency p50/p90
    per version, answer agreement per task (shadow: the same request; canary: the same input),
    and the verdict of the promotion policy's canary tolerances. Exit 1 when not clean."""
    from ..config import get_settings
    from ..monitoring.canary import canary_report
    from ..monitoring.log_schema import read_log
    from ..registry.promotion import load_policy
    tolerance = load_policy().canary
    try:
        start = parse_since(since) if since else datetime.now(UTC) - timedelta(days=tolerance.window_days)
        store = get_settings().inference_log_store
        out = canary_report(read_log(store, since=start), tolerance, candidate, production)
    except ValueError as err:
        fail(str(err))
    say(json.dumps(out.to_dict(), indent=1) if json_out else out.render())
    if not out.clean:
        raise typer.Exit(1)
