"""The `retrain` flow: DVC-versioned data -> Great Expectations gate -> (next issues:
two-stage tuning on Ray -> evaluation -> registry promotion -> serving).

Thin: each task calls one `skyeye` function and passes paths and hashes, never live
objects. Run it with `python -m flows.retrain` (or `make demo`); with no
PREFECT_API_URL, Prefect starts its temporary local server.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from skyeye.config import DataConfig, configure_environment, get_settings, load_yaml_config

configure_environment()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402


@task(name="synth")
def synth_task(scale: str, seed: int) -> str:
    from skyeye.synth.corpus import synthesize
    out = get_settings().synth_dir
    summary = synthesize(out, scale=scale, seed=seed, progress=False)
    get_run_logger().info("SkyEye-Synth %s: %s", scale, summary)
    return str(out)


@task(name="build")
def build_task(root: str, sources: dict[str, str]) -> str:
    from skyeye.data.instructions import build
    out = get_settings().instructions_dir
    card = build(Path(root), out, {k: Path(v) for k, v in sources.items()})
    get_run_logger().info("instructions: stage1=%d stage2=%d", card["stage1"]["total"], card["stage2"]["total"])
    return str(out)


@task(name="version")
def version_task(instructions: str, commit: bool) -> str:
    from skyeye.versioning import ensure_dvc, version_data
    root = get_settings().project_root
    ensure_dvc(root)
    report = version_data(root, commit=commit, message="data: new version from the retrain flow")
    get_run_logger().info(report.render())
    return report.md5


@task(name="validate")
def validate_task(instructions: str, md5: str) -> str:
    from skyeye.gate import run_gate
    result, run_id = run_gate(Path(instructions))
    logger = get_run_logger()
    logger.info("data gate %s for %s (MLflow run %s)", "passed" if result.success else "FAILED", md5, run_id)
    if not result.success:
        raise RuntimeError("data gate failed:\n" + result.render())
    return run_id


@flow(name="retrain", log_prints=True)
def retrain(data_config: str = "configs/data.yaml", scale: str | None = None) -> dict:
    """Synthesize (stand-in for new data arriving) -> build -> version -> validate."""
    cfg = load_yaml_config(get_settings().project_root / data_config, DataConfig)
    if scale:
        cfg = cfg.model_copy(update={"scale": DataConfig(scale=scale).scale})
    synth_root = synth_task(cfg.scale, cfg.seed)
    instructions = build_task(synth_root, {k: str(v) for k, v in cfg.sources.items()})
    md5 = version_task(instructions, cfg.commit_data)
    validation_run = validate_task(instructions, md5)
    return {"data_md5": md5, "validation_run": validation_run}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the retrain flow on the embedded defaults.")
    parser.add_argument("--data-config", default="configs/data.yaml", help="data steps config (relative to the project)")
    parser.add_argument("--scale", choices=["tiny", "demo", "full"], help="override the config's scale")
    args = parser.parse_args()
    print(retrain(data_config=args.data_config, scale=args.scale))
