"""The drift monitor: a window of the inference log against the training data of the served
version (skyeye/monitoring/drift.py computes; this flow wires). Daily under `skyeye schedule up`
(configs/monitor.yaml's cron) and by hand with `skyeye monitor`.

serve -> inference log -> monitor -> `skyeye.drift.detected` -> retrain (flows/schedule.py).
Each run with enough traffic logs an MLflow run (experiment `skyeye-monitoring`: the figures,
a plot per signal, the table) and a Prefect markdown artifact; a signal past its threshold
emits the event, which starts the `retrain` deployment (one at a time, as its other triggers).
"""
from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from skyeye.config import get_settings
from skyeye.monitoring.config import load_monitor_config
from skyeye.monitoring.drift import DriftReport, compare, window_of
from skyeye.monitoring.log_schema import read_log

DRIFT_EVENT = "skyeye.drift.detected"
DRIFT_RESOURCE = "skyeye.drift"


def served_version() -> tuple[int, dict[str, str]]:
    """The production version and its lineage tags."""
    from skyeye.model.references import RegistryError, model_name, production_version
    from skyeye.tracking import runs
    version = production_version()
    if version is None:
        raise RegistryError(f"no production version of {model_name()}: nothing is served, nothing to compare")
    return version, runs.client().get_model_version(model_name(), str(version)).tags


def training_data(md5: str, git_rev: str | None):
    """A reader of data version `md5`'s files (paths relative to the project root), and where
    it reads: the local data/ when data.dvc records that md5, else DVC at commit `git_rev`."""
    from dvc.api import DVCFileSystem

    from skyeye.datagate.versioning import DVC_FILE, current_version, dvc_file_at, parse_dvc_file
    from skyeye.monitoring.reference import ReferenceError
    root = get_settings().project_root
    here = current_version(root)
    if here is not None and here.md5 == md5:
        return (lambda rel: (root / rel).read_bytes()), f"the local data/ (data.dvc records {md5})"
    text = dvc_file_at(root, git_rev) if git_rev else None
    if text is None or parse_dvc_file(text, f"{DVC_FILE} at {git_rev}")["md5"] != md5:
        raise ReferenceError(f"data version {md5} of the served version: the local data.dvc records "
                             f"{here.md5 if here else 'nothing'} and commit {git_rev or '(none recorded)'} holds no "
                             "data.dvc with it; check it out (`skyeye data checkout`) or push it to the DVC remote")
    fs = DVCFileSystem(str(root), rev=git_rev)
    return (lambda rel: fs.read_bytes(rel)), f"DVC at commit {git_rev[:12]}"


def log_run(report: DriftReport, tags: dict[str, str], title: str) -> str:
    """The MLflow run of one monitor run: metrics, a plot per signal, the table."""
    from skyeye.monitoring.plots import draw
    from skyeye.tracking import runs
    from skyeye.tracking.names import MONITORING_EXPERIMENT
    with runs.tracked_run(MONITORING_EXPERIMENT, title, tags) as run_id:
        runs.log_metrics(run_id, report.metrics())
        client = runs.client()
        with tempfile.TemporaryDirectory() as tmp:
            draw(report, tmp, title)
            client.log_artifacts(run_id, tmp, "plots")
        client.log_text(run_id, report.table() + "\n", "drift.txt")
    return run_id


@flow(name="monitor", log_prints=False)
def monitor(window_hours: float | None = None, until: str | None = None, emit: bool = True) -> dict:
    """Compare the last `window_hours` (configs/monitor.yaml) of the inference log, up to `until`
    (ISO time, UTC unless it names an offset; default now), with the served version's training
    data; emit `skyeye.drift.detected` when a signal crosses its threshold (unless `emit` is false)."""
    from skyeye.model.references import load, model_name
    from skyeye.monitoring.reference import ReferenceError, cached_reference
    from skyeye.tracking.names import (
        IMPORTED_DATA,
        KIND_DRIFT,
        TAG_DVC_MD5,
        TAG_GIT_REV,
        TAG_KIND,
        TAG_MODEL_VERSION,
        UNVERSIONED,
    )
    logger, cfg, settings = get_run_logger(), load_monitor_config(), get_settings()
    end = datetime.fromisoformat(until) if until else datetime.now(UTC)
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)  # no offset given: UTC
    start = end - timedelta(hours=window_hours or cfg.window_hours)
    window, answers = window_of(read_log(settings.inference_log_store, start, end))
    out = {"since": start.isoformat(), "until": end.isoformat(), "rows": len(window.tasks), "drifted": [],
           "event": False, "run_id": None}
    if len(window.tasks) < cfg.min_rows:
        out["table"] = DriftReport(len(window.tasks), cfg.min_rows).table()
        logger.info(out["table"])
        create_markdown_artifact(key="drift", markdown=f"## Drift\n{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} "
                                 f"UTC: {out['table']}; no verdict, no event.", description="drift monitor")
        return out
    version, lineage = served_version()
    md5, rev = lineage.get(TAG_DVC_MD5, ""), lineage.get(TAG_GIT_REV)
    if md5 in ("", UNVERSIONED, IMPORTED_DATA):
        raise ReferenceError(f"version {version} of {model_name()} has no SkyEye data version ({md5 or 'none'}): "
                             "no training data to compare its traffic with")
    model = load(f"models:/{model_name()}/{version}").model
    reference, where = cached_reference(md5, model, cfg, lambda: training_data(md5, rev))
    report = compare(reference, window, answers, cfg)
    title = f"drift v{version} {start:%Y-%m-%d %H:%M}..{end:%H:%M}"
    run_id = log_run(report, {TAG_KIND: KIND_DRIFT, TAG_MODEL_VERSION: str(version), TAG_DVC_MD5: md5,
                              "skyeye.monitor.since": start.isoformat(), "skyeye.monitor.until": end.isoformat()},
                     title)
    out |= {"version": version, "data_md5": md5, "reference": where, "drifted": report.drifted, "run_id": run_id,
            "table": report.table(), "metrics": report.metrics()}
    # one line: the table is in the MLflow run and the artifact, and `skyeye monitor` prints it
    logger.info("version %s, %s requests against data version %s (%s): %s past its threshold", version, out["rows"],
                md5, where, ", ".join(report.drifted) or "no signal")
    if report.drifted and emit:
        from prefect.events import emit_event
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": DRIFT_RESOURCE},
                   payload={"version": version, "data_md5": md5, "signals": report.drifted, "run_id": run_id,
                            "since": out["since"], "until": out["until"]})
        from prefect.events.worker import EventsWorker
        EventsWorker.drain_all()  # sent now: `skyeye monitor` is a short command, and its server may go next
        out["event"] = True
        logger.warning("drift in %s: %s emitted (retrain starts on it)", ", ".join(report.drifted), DRIFT_EVENT)
    verdict = f"**drift**: {', '.join(report.drifted)}; `{DRIFT_EVENT}` emitted" if out["event"] else (
        f"**drift**: {', '.join(report.drifted)} (no event: emit off)" if report.drifted else "no drift")
    create_markdown_artifact(key="drift", description="drift monitor", markdown="\n".join([
        f"## Drift of version {version}", f"- window: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC, "
        f"{out['rows']} requests", f"- reference: data version `{md5}` ({where})", f"- MLflow run: `{run_id}` "
        "(plots under `plots/`)", f"- verdict: {verdict}", "", f"```\n{report.table()}\n```"]))
    return out
