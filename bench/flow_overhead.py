"""Where the time of a `retrain` run goes: per step, its wall time, of which compute (data
generation, backbone pretraining, the training loops, the model's answers and scores) and
the rest (flow and task start-up, Ray start, MLflow logging, DVC, Great Expectations); the
orchestration share of a first run, and the wall time of the unchanged rerun. Prints JSON.

    python bench/flow_overhead.py [--scale demo] [--keep PATH]

Runs in a fresh throw-away project (the configs of this one, nothing cached), as `make
demo` would: a first run, then the same command again. Each run is a child process of this
script that times the library calls of each step from inside the flow.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# step -> the library call that is its compute ("module:function"); what a step spends
# outside these is orchestration and bookkeeping
COMPUTE = {"synth": "skyeye.synth.corpus:synthesize", "build": "skyeye.data.instructions:build",
           "backbones": "skyeye.training.backbones:build_backbones",
           "evaluate": "skyeye.evaluation.runner:_score_split"}


def _child(scale: str, out: Path) -> None:
    """One retrain run in this process, the compute of each step timed."""
    import importlib
    started = time.perf_counter()
    spent: dict[str, float] = {}

    def timed(step: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[step] = spent.get(step, 0.0) + time.perf_counter() - t
        return wrapper

    for step, target in COMPUTE.items():
        module, name = target.split(":")
        mod = importlib.import_module(module)
        setattr(mod, name, timed(step, getattr(mod, name)))
    from flows.retrain import retrain
    state = retrain(scale=scale, return_state=True)
    result = state.result()
    flow_wall = time.perf_counter() - started
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from skyeye.tracking import runs
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    steps = {}
    for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time):
        name = t.name.rsplit("-", 1)[0]
        wall = (t.end_time - t.start_time).total_seconds() if t.start_time and t.end_time else 0.0
        steps[name] = {"wall_s": round(wall, 2), "state": t.state_name, "compute_s": round(spent.get(name, 0.0), 2)}
    # the training loops run in Ray workers: their stage runs say how long, and how much was Ray's start
    for name, key in (("stage1", "stage1_model"), ("stage2", "stage2_model")):
        if name in steps and steps[name]["state"] != "Cached":
            found = runs.client().search_runs([runs.experiment_id("skyeye-tuning")],
                                              filter_string=f"tags.`skyeye.model_dir` = '{result[key]}'")
            m = found[0].data.metrics if found else {}
            steps[name]["ray_start_s"] = round(m.get("startup_s", 0.0), 2)
            steps[name]["compute_s"] = round(m.get("wall_s", 0.0) - m.get("startup_s", 0.0), 2)
    out.write_text(json.dumps({"flow_wall_s": round(flow_wall, 2), "steps": steps,
                               "flow_run_start_s": round((run.start_time - run.expected_start_time).total_seconds(), 2)
                               if run.start_time else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.scale, args.child)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="skyeye-flow-bench-"))
    project = work / "project"
    shutil.copytree(REPO / "configs", project / "configs")
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    (project / "mlruns").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    env = {"SKYEYE_PROJECT_ROOT": str(project), "PYTHONPATH": str(REPO)}
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SKYEYE_"))} | env
    report: dict = {"scale": args.scale, "runs": {}}
    for label in ("first", "rerun"):
        out = work / f"{label}.json"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--scale", args.scale, "--child",
                               str(out)], cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"the {label} run failed:\n{proc.stderr[-4000:]}")
        child = json.loads(out.read_text())
        compute = sum(s["compute_s"] for s in child["steps"].values())
        report["runs"][label] = {"wall_s": round(wall, 1), **child, "compute_s": round(compute, 1),
                                 "rest_s": round(wall - compute, 1),
                                 "orchestration_share": round((wall - compute) / wall, 3)}
    first, rerun = report["runs"]["first"], report["runs"]["rerun"]
    report["rerun_over_first"] = round(rerun["wall_s"] / first["wall_s"], 3)
    report["reused_in_rerun"] = [k for k, s in rerun["steps"].items() if s["state"] == "Cached"]
    print(json.dumps(report, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
