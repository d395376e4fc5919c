"""Retraining that runs itself: SkyEye's Prefect deployments, declared here in one place,
registered and run by `skyeye schedule up` against the Prefect server at PREFECT_API_URL.

- `retrain/retrain`: on a cron schedule (configs/schedule.yaml, weekly by default),
  whenever a `skyeye.data.versioned` event announces a new data version (`skyeye data
  version --commit` emits it) and whenever the drift monitor emits `skyeye.drift.detected`.
  One run at a time, whatever started it: a second start waits (`enqueue`) or is dropped
  (`skip`), as configured, never two trainings on one machine.
- `monitor/monitor`: daily (configs/monitor.yaml's cron), the drift monitor (flows/monitor.py).
- `rollout/serve`: on each `skyeye.model.production-moved` event, with the new version as
  its parameter: deploys it on the cluster (RAY_ADDRESS), or waits for the local `skyeye
  serve` that follows production.

The event comes from the production watcher, a thread of `skyeye schedule up`: every
`watch_every_s` it compares the `production` alias with what it saw last and emits the
event when it moved, whatever moved it (the flow, `skyeye promote`, `skyeye rollback`,
the MLflow UI). A thread, not a scheduled deployment: a flow run a minute would be 1,440
runs a day in the UI, each a new Python process on a 2-core machine.

Schedules and triggers need a real Prefect server; Prefect's temporary server has none.
"""
from __future__ import annotations

import asyncio
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skyeye.config import LOCAL_HOST, PREFECT_PORT, get_settings, load_yaml_config

DATA_EVENT = "skyeye.data.versioned"
PRODUCTION_EVENT = "skyeye.model.production-moved"
SEEN_VARIABLE = "skyeye_production_seen"  # the version the production watcher saw last (a Prefect variable)


class RetrainSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str | None = Field("0 3 * * 1", description="When retrain runs (UTC); null: only on new data.")
    on_new_data: bool = Field(True, description="Retrain when a data version is committed.")
    on_drift: bool = Field(True, description="Retrain when the drift monitor emits skyeye.drift.detected.")
    when_busy: Literal["enqueue", "skip"] = Field(
        "enqueue", description="A start while a retrain runs: wait for it, or be dropped.")
    parameters: dict = Field(default_factory=dict, description="Parameters of the retrain flow runs.")


class ScheduleConfig(BaseModel):
    """configs/schedule.yaml."""
    model_config = ConfigDict(extra="forbid")
    retrain: RetrainSchedule = RetrainSchedule()
    watch_every_s: float = Field(60, ge=1, description="How often the production watcher reads the alias.")


def load_schedule_config(path: str | Path | None = None) -> ScheduleConfig:
    path = Path(path) if path else get_settings().project_root / "configs" / "schedule.yaml"
    return load_yaml_config(path, ScheduleConfig) if path.exists() else ScheduleConfig()  # type: ignore[return-value]


def api_url() -> str | None:
    """The Prefect server to register with, if it answers."""
    import httpx
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    try:
        return url if httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200 else None
    except httpx.HTTPError:
        return None


NO_SERVER = ("no Prefect server at PREFECT_API_URL ({url}). Schedules and triggers need one: start it "
             "with `skyeye server up` (Prefect and MLflow UIs on loopback), then\n"
             f"  export PREFECT_API_URL=http://{LOCAL_HOST}:{PREFECT_PORT}/api\nand run this again.")


def deployments(cfg: ScheduleConfig | None = None) -> list:
    """The RunnerDeployments of SkyEye, from configs/schedule.yaml."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from flows.monitor import DRIFT_EVENT, DRIFT_RESOURCE, monitor
    from flows.retrain import retrain
    from flows.serve import rollout
    from skyeye.monitoring.config import load_monitor_config
    cfg = cfg or load_schedule_config()
    r = cfg.retrain
    triggers = [DeploymentEventTrigger(name="retrain on a new data version", expect={DATA_EVENT},
                                       match={"prefect.resource.id": "skyeye.data"},
                                       parameters={"expected_md5": "{{ event.payload.md5 }}"})] if r.on_new_data else []
    if r.on_drift:  # the same deployment: its concurrency limit covers every start
        triggers.append(DeploymentEventTrigger(name="retrain on drift", expect={DRIFT_EVENT},
                                               match={"prefect.resource.id": DRIFT_RESOURCE}))
    module = {"entrypoint_type": EntrypointType.MODULE_PATH}  # `flows` is installed: runs from any folder
    strategy = ConcurrencyLimitStrategy.ENQUEUE if r.when_busy == "enqueue" else ConcurrencyLimitStrategy.CANCEL_NEW
    return [
        # the served model is rolled by the production watcher's event, not by retrain itself
        retrain.to_deployment(name="retrain", cron=r.cron, triggers=triggers,
                              parameters={"rollout": False, **r.parameters},
                              concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
                              description="Retrain SkyEyeGPT: weekly, on new data versions and on drift.", **module),
        rollout.to_deployment(name="serve", triggers=[DeploymentEventTrigger(
            name="serve the new production", expect={PRODUCTION_EVENT}, match={"prefect.resource.id": "skyeye.model.*"},
            parameters={"version": "{{ event.payload.version }}"})],
            description="Serve the version production moved to.", **module),
        monitor.to_deployment(name="monitor", cron=load_monitor_config().cron,
                              concurrency_limit=ConcurrencyLimitConfig(
                                  limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                              description="Drift of the inference log against the served version's training data; "
                                          "emits skyeye.drift.detected (retrain starts on it).", **module),
    ]


def watch_production() -> int | None:
    """One look at the production alias: emit `skyeye.model.production-moved` when it differs
    from what was seen last. The first look only records."""
    from prefect.events import emit_event
    from prefect.variables import Variable

    from skyeye.model.references import model_name, production_version
    current = production_version()
    seen = Variable.get(SEEN_VARIABLE, default=None)
    if current is not None and seen != current:
        if seen is not None:
            emit_event(event=PRODUCTION_EVENT, resource={"prefect.resource.id": f"skyeye.model.{model_name()}"},
                       payload={"version": current, "previous": seen})
            _log().info("production moved: version %s -> %s; %s emitted", seen, current, PRODUCTION_EVENT)
        Variable.set(SEEN_VARIABLE, current, overwrite=True)
    return current


def _log():
    from prefect.logging import get_logger
    return get_logger("skyeye.schedule")


def last_seen() -> int | None:
    """The production version the watcher saw last."""
    from prefect.variables import Variable
    return Variable.get(SEEN_VARIABLE, default=None)


class ProductionWatcher(threading.Thread):
    def __init__(self, every_s: float):
        super().__init__(name="production-watcher", daemon=True)
        self.every_s, self.stopped = every_s, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                watch_production()
            except Exception:  # a busy store or a restarting server: look again next time
                _log().exception("the production watcher could not read the alias; retrying in %s s", self.every_s)
            self.stopped.wait(self.every_s)


def up() -> None:
    """Register the deployments and run them in this process, with the production watcher,
    until Ctrl-C."""
    from prefect import serve
    cfg = load_schedule_config()
    watcher = ProductionWatcher(cfg.watch_every_s)
    watcher.start()
    try:
        serve(*deployments(cfg), print_starting_message=True)
    finally:
        watcher.stopped.set()


# ---------------------------------------------------------------- status, pause, resume

def _ours(client) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    return client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain", "rollout", "monitor"])))


def status() -> list[dict]:
    """Each deployment: its schedules and triggers, paused or not, the next run, the last runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    rows = []
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
        flows = {}
        for d in _ours(client):
            flows.setdefault(d.flow_id, client.read_flow(d.flow_id).name)
            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
            scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
            upcoming = client.read_flow_runs(deployment_filter=by_deployment, flow_run_filter=scheduled,
                                             sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            recent = [r for r in client.read_flow_runs(deployment_filter=by_deployment,
                                                       sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=10)
                      if r.state_type != StateType.SCHEDULED][:3]
            triggers = [a.name for a in automations
                        if any(str(getattr(act, "deployment_id", "")) == str(d.id) for act in a.actions)]
            rows.append({"deployment": f"{flows[d.flow_id]}/{d.name}", "paused": d.paused,
                         "schedules": [_schedule_text(s.schedule) for s in d.schedules], "triggers": triggers,
                         "next_run": None if d.paused else (upcoming[0].expected_start_time.isoformat()
                                                           if upcoming else _next_from_schedules(d)),
                         "last_runs": [f"{r.name} {r.state_name} {_when(r.start_time or r.expected_start_time)}"
                                       for r in recent]})
    return rows


def _next_from_schedules(deployment) -> str | None:
    """The next start by the deployment's own active schedules. The server fills in scheduled runs
    only on its scheduler's next pass (every 60 s by default), so a fresh deployment has none yet."""
    from prefect.server.schemas import schedules as server_schedules  # the server's own date rules
    kinds = {"CronSchedule": server_schedules.CronSchedule, "IntervalSchedule": server_schedules.IntervalSchedule,
             "RRuleSchedule": server_schedules.RRuleSchedule}
    dates = []
    for row in deployment.schedules:
        kind = kinds.get(type(row.schedule).__name__)
        if row.active and kind:
            dates += asyncio.run(kind.model_validate(row.schedule.model_dump()).get_dates(1))
    return min(dates).isoformat() if dates else None


def _schedule_text(schedule) -> str:
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron} ({schedule.timezone or 'UTC'})"
    if getattr(schedule, "interval", None):
        return f"every {int(schedule.interval.total_seconds())} s"
    return str(schedule)


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if t else "-"


def set_paused(paused: bool, name: str | None = None) -> list[str]:
    """Pause (or resume) our deployments, or the one named `flow/deployment`; returns those changed."""
    from prefect import get_client
    changed = []
    with get_client(sync_client=True) as client:
        for d in _ours(client):
            full = f"{client.read_flow(d.flow_id).name}/{d.name}"
            if name in (None, full, d.name):
                (client.pause_deployment if paused else client.resume_deployment)(d.id)
                changed.append(full)
    if name and not changed:
        raise ValueError(f"no SkyEye deployment named {name!r}; see `skyeye schedule status`")
    return changed


# ---------------------------------------------------------------- events

def emit_data_versioned(md5: str, git_rev: str | None = None) -> bool:
    """Announce a committed data version (retrain's trigger); False when no server listens."""
    if not api_url():
        return False
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    emit_event(event=DATA_EVENT, resource={"prefect.resource.id": "skyeye.data", "prefect.resource.name": md5},
               payload={"md5": md5, "git_rev": git_rev})
    EventsWorker.drain_all()  # a short command: send before the process ends
    return True
