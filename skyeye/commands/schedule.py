"""`skyeye server up` and `skyeye schedule ...`: the local Prefect server and MLflow UI, and
the deployments that retrain and serve by themselves (`flows/schedule.py`)."""
from __future__ import annotations

import json
import os
import time
from typing import Annotated, Optional

import typer

from ..config import LOCAL_HOST, MLFLOW_PORT, PREFECT_PORT, get_settings
from .console import fail, interrupt, say
from .inputs import PORT

schedule_app = typer.Typer(help="Retraining that runs itself: Prefect deployments, schedules and triggers "
                                "(configs/schedule.yaml), on the Prefect server at PREFECT_API_URL.",
                           no_args_is_help=True, rich_markup_mode=None)
server_app = typer.Typer(help="The Prefect server and the MLflow UI on this machine.", no_args_is_help=True,
                         rich_markup_mode=None)


@server_app.command("up")
def server_up(
    host: Annotated[str, typer.Option(help="Interface (loopback by default).")] = LOCAL_HOST,
    prefect_port: Annotated[int, typer.Option(callback=PORT, help="Port of the Prefect server and its UI.")
                            ] = PREFECT_PORT,
    mlflow_port: Annotated[int, typer.Option(callback=PORT, help="Port of the MLflow UI.")] = MLFLOW_PORT,
) -> None:
    """Start the Prefect server (state under .skyeye/prefect) and the MLflow UI beside it, print
    their URLs, and keep them up until Ctrl-C."""
    import signal

    from flows import servers
    try:
        up = servers.start(host, prefect_port, mlflow_port)
    except RuntimeError as err:
        fail(f"{err} (logs: {get_settings().state / 'logs'})")
    say(f"Prefect UI  {up.prefect_url}\n"
         f"MLflow UI   {up.mlflow_url or 'the tracking server: ' + get_settings().tracking_uri}\n"
         f"point the commands at it:  export PREFECT_API_URL={up.prefect_url}/api\n"
         "then: skyeye schedule up (Ctrl-C stops the servers)")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while all(p.poll() is None for p in up.processes):
            time.sleep(1)
        say("a server exited; stopping")
    except KeyboardInterrupt:
        say("stopping")
    finally:
        up.stop()


def _need_server() -> None:
    from flows.schedule import NO_SERVER, api_url
    if not api_url():
        fail(NO_SERVER.format(url=os.environ.get("PREFECT_API_URL") or "unset"))


@schedule_app.command("up")
def schedule_up() -> None:
    """Register the deployments (retrain on a schedule and on new data, watch-production, serve)
    and run them in this process until Ctrl-C."""
    _need_server()
    from flows.schedule import up
    up()


@schedule_app.command("status")
def schedule_status(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Each deployment: its schedules and triggers, paused or not, the next run, the last runs."""
    _need_server()
    from flows.schedule import status
    rows = status()
    if json_out:
        say(json.dumps(rows, indent=1))
        return
    if not rows:
        say("no SkyEye deployments registered: run `skyeye schedule up`")
    from flows.schedule import last_seen, load_schedule_config
    say(f"production watcher (in `skyeye schedule up`): every {load_schedule_config().watch_every_s:g} s, "
         f"last saw version {last_seen() or '-'}")
    for r in rows:
        say(f"{r['deployment']}{'  (paused)' if r['paused'] else ''}\n"
             f"  schedules  {', '.join(r['schedules']) or 'none'}\n  triggers   {', '.join(r['triggers']) or 'none'}\n"
             f"  next run   {r['next_run'] or '-'}\n  last runs  {'; '.join(r['last_runs']) or '-'}")


def _pause(paused: bool, deployment: str | None) -> None:
    _need_server()
    from flows.schedule import set_paused
    try:
        say(("paused: " if paused else "resumed: ") + ", ".join(set_paused(paused, deployment)))
    except ValueError as err:
        fail(str(err))


DEPLOYMENT_ARG = Annotated[Optional[str], typer.Argument(
    help="flow/deployment, e.g. retrain/retrain (default: all of SkyEye's).")]


@schedule_app.command("pause")
def schedule_pause(deployment: DEPLOYMENT_ARG = None) -> None:
    """Pause deployments: no scheduled or triggered runs until resumed."""
    _pause(True, deployment)


@schedule_app.command("resume")
def schedule_resume(deployment: DEPLOYMENT_ARG = None) -> None:
    """Resume paused deployments."""
    _pause(False, deployment)
