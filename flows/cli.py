"""The `skyeye` command (pyproject.toml's console script): the library's commands
(`skyeye/cli.py`) and the ones that drive Prefect, which the library never imports:

- `skyeye serve`: the serve flow (`flows/serve.py`), following the production alias;
- `skyeye server up`: the local Prefect server and the MLflow UI (`flows/servers.py`);
- `skyeye schedule ...`: the deployments that retrain and serve by themselves (`flows/schedule.py`);
- `skyeye monitor`: the drift monitor now (`flows/monitor.py`), as its daily deployment runs it;
- `skyeye data version --commit` also announces the "data versioned" event a scheduled
  retrain starts on.

The flows are imported inside the commands: they bring Prefect, httpx and Ray, which
`skyeye --help` and the library's commands never need.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Annotated, Optional

import typer

from skyeye.cli import app, on_data_committed
from skyeye.commands.console import fail, interrupt, say
from skyeye.commands.inputs import PORT, free_port, in_range
from skyeye.commands.supervise import supervise, supervised
from skyeye.config import LOCAL_HOST, MLFLOW_PORT, PREFECT_PORT, REGISTERED_MODEL, get_settings

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
        pass
    finally:
        up.stop()
        say(f"stopped: the Prefect server at {up.prefect_url}" + (f" and the MLflow UI at {up.mlflow_url}"
                                                                   if up.mlflow_url else ""))


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
    signal.signal(signal.SIGTERM, interrupt)  # `kill` (and the supervisor's relay) stop it as Ctrl-C does
    try:
        up()
    except KeyboardInterrupt:
        pass
    say("stopped: the deployments stay registered on the Prefect server; `skyeye schedule up` runs them again")


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


def announce_data_version(report) -> str | None:
    """The "data versioned" event of a committed `skyeye data version` (a VersionReport)."""
    from flows.schedule import DATA_EVENT, emit_data_versioned
    if emit_data_versioned(report.md5, report.git_rev):
        return f"announced {DATA_EVENT} for {report.md5} (a scheduled retrain starts on it)"
    return None


def serve(
    model: Annotated[Optional[str], typer.Option(
        "--model", help=f"Registry reference to serve (default: models:/{REGISTERED_MODEL}@production, followed as it "
                        "moves).")
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default: configs/serve.yaml).")] = None,
    port: Annotated[Optional[int], typer.Option(
        callback=PORT, help="Port (default: configs/serve.yaml, 8000).")] = None,
    follow_every: Annotated[float, typer.Option(
        callback=in_range(0.1), help="Seconds between checks of the production alias.")] = 10.0,
    canary: Annotated[Optional[float], typer.Option(
        "--canary", callback=in_range(0.001, 100), help="Serve the candidate beside production and send it this "
                                                      "percentage of the requests (canary.mode: canary).")] = None,
    shadow: Annotated[bool, typer.Option(
        "--shadow", help="Serve the candidate beside production in shadow: it answers a copy of each request, the "
                         "client gets production's answer (canary.mode: shadow).")] = False,
    candidate: Annotated[Optional[str], typer.Option(
        "--candidate", help="The candidate's registry reference (default: configs/serve.yaml canary.candidate, "
                            "staging; an alias is followed as it moves).")] = None,
) -> None:
    """Serve a registered SkyEyeGPT on Ray Serve: the OpenAI API at http://HOST:PORT/v1.

    With RAY_ADDRESS, deploys to that cluster and returns. Otherwise runs a local server in
    the foreground until Ctrl-C; without --model it follows the production alias, so a
    promotion or `skyeye rollback` rolls the served version within --follow-every seconds.
    With --canary PERCENT or --shadow the candidate (staging by default) is served beside it."""
    # before Prefect's temporary server and Ray start: the config, the port, the model
    from flows.serve import serve_config
    from skyeye.model.references import RegistryError, model_name, production_uri, resolve_version
    from skyeye.serving import deploy
    from skyeye.serving.config import load_serve_config
    if canary is not None and shadow:
        fail("--canary and --shadow: choose one (a share of the traffic, or a copy of all of it)")
    overrides = {k: v for k, v in {"mode": "canary" if canary is not None else "shadow" if shadow else None,
                                   "canary_percent": canary, "candidate": candidate}.items() if v is not None}
    cfg = serve_config(canary=overrides)
    if not os.environ.get("RAY_ADDRESS"):  # a local server: the port must be free here
        free_port(host or cfg.host, port or cfg.port)
    try:
        resolve_version(model or production_uri())
    except RegistryError as err:
        fail(f"--model {err}")
    try:
        deploy.candidate_version(cfg)
    except RegistryError as err:
        fail(f"--candidate {err}")

    from flows.serve import serve as serve_flow
    try:
        out = serve_flow(model=model, host=host, port=port, canary=overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        fail(str(err))
    say(f"serving {model_name()} version {out['version']} at {out['url']}/v1 (health: {out['url']}/health)")
    if out["mode"] != "off":
        say(f"candidate version {out['candidate']} beside it: {out['mode']}")
    if os.environ.get("RAY_ADDRESS"):
        return
    deploy.write_state(out["url"], out["version"], None if model else "production")
    signal.signal(signal.SIGTERM, interrupt)  # `kill` (and the supervisor's relay of Ctrl-C) stop it cleanly
    try:
        while True:
            time.sleep(follow_every)
            wanted = resolve_version(production_uri()) if model is None else out["version"]
            try:
                beside = deploy.candidate_version(cfg)  # the candidate's alias moves too
            except RegistryError:  # its alias removed: production's own version (sent nothing) until set again
                beside = out["candidate"] and wanted
            if (wanted, beside) != (out["version"], out["candidate"]):
                moved = "production moved" if wanted != out["version"] else "the candidate moved"
                pinned = overrides | ({"candidate": str(beside)} if beside else {})  # the versions just compared
                out = serve_flow(model=str(wanted), host=host, port=port, canary=pinned)
                deploy.write_state(out["url"], out["version"], None if model else "production")
                beside_text = f", candidate version {out['candidate']} beside it ({out['mode']})"
                say(f"{moved}: now serving version {out['version']}" + (beside_text if out["mode"] != "off" else ""))
    except KeyboardInterrupt:
        pass
    finally:
        # the record first: the registry must not say a version is served after its server is gone
        key = os.environ.get(load_serve_config().api_key_env)
        serving = deploy.served_version(out["url"], key, timeout_s=1) or out["version"]  # a rollout cut short?
        until = deploy.record_stop(serving, out["url"])
        deploy.remove_state()
        deploy.shutdown(started_ray=True)  # Serve drains the requests in flight, the replicas write their log
        flushed = f"; the inference log flushed to {deploy.log_store()}" if cfg.inference_log.enabled else ""
        say(f"stopped: version {serving} served at {out['url']} until {until}{flushed}")


def monitor(
    window_hours: Annotated[Optional[float], typer.Option(
        callback=in_range(0.01), help="Hours of the inference log to compare, ending now (default: "
                                      "configs/monitor.yaml).")] = None,
    until: Annotated[Optional[str], typer.Option(help="End of the window, ISO time (default: now).")] = None,
    no_event: Annotated[bool, typer.Option("--no-event", help="Report only: emit no drift event.")] = False,
) -> None:
    """Compare a window of the inference log with the served version's training data: task mix,
    prompt length, image size, image content (frozen-encoder signatures), unparsable boxes and
    answers cut at the token limit. Drift emits skyeye.drift.detected, which starts the retrain
    deployment of `skyeye schedule up` (with PREFECT_API_URL set to its server)."""
    from flows.monitor import DRIFT_EVENT
    from flows.monitor import monitor as monitor_flow
    from skyeye.model.references import RegistryError
    from skyeye.monitoring.reference import ReferenceError
    if until:
        try:
            from datetime import datetime
            datetime.fromisoformat(until)
        except ValueError:
            fail(f"--until {until!r}: not an ISO time (e.g. 2026-12-06T04:00+00:00)")
    try:
        out = monitor_flow(window_hours=window_hours, until=until, emit=not no_event)
    except (RegistryError, ReferenceError, ValueError) as err:
        fail(str(err))
    say(f"inference log {out['since'][:16]} to {out['until'][:16]} UTC: {out['rows']} requests")
    if out.get("version") is not None:
        say(f"served version {out['version']}, trained on data version {out['data_md5']} ({out['reference']})")
    say(out["table"])
    if out["run_id"]:
        say(f"MLflow run {out['run_id']} (experiment skyeye-monitoring: figures and a plot per signal)")
    if out["event"]:
        say(f"drift in {', '.join(out['drifted'])}: {DRIFT_EVENT} emitted"
            + ("" if os.environ.get("PREFECT_API_URL") else " (to Prefect's temporary server: set PREFECT_API_URL "
               "to the server of `skyeye schedule up` for retrain to start on it)"))
    elif out.get("drifted"):
        say(f"drift in {', '.join(out['drifted'])}: no event (--no-event)")


# after the library's own commands, in the order `skyeye --help` has always listed them
app.command("serve")(serve)
app.command("monitor")(monitor)
app.add_typer(schedule_app, name="schedule")
app.add_typer(server_app, name="server")
on_data_committed.append(announce_data_version)


# commands that run until stopped: a terminal's Ctrl-C reaches only a supervisor, which stops them
# in order (skyeye/commands/supervise.py)
LONG_LIVED = (("serve",), ("schedule", "up"), ("server", "up"))


def main() -> None:  # pragma: no cover - console entry point (tests run the commands as processes)
    args = sys.argv[1:]
    words = [a for a in args if not a.startswith("-")]
    if not supervised() and "--help" not in args and any(words[:len(c)] == list(c) for c in LONG_LIVED):
        sys.exit(supervise([sys.executable, "-m", "flows.cli", *args]))
    app(prog_name="skyeye")


if __name__ == "__main__":  # pragma: no cover
    main()
