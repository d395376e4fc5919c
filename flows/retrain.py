"""The `retrain` flow: DVC-versioned data -> Great Expectations gate -> backbones ->
two-stage tuning on Ray (stage 1, stage 2) -> evaluation on the 8 benchmarks -> registry
-> promotion (staging, then production when the policy allows).

Thin: each task calls one `skyeye` function and passes paths and hashes, never live
objects. Run it with `python -m flows.retrain` (or `make demo`); with no
PREFECT_API_URL, Prefect starts its temporary local server.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from skyeye.config import DataConfig, configure_environment, get_settings, load_yaml_config
from skyeye.formats.benchmarks import HELDOUT, primary_of

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
    from skyeye.datagate.versioning import ensure_dvc, version_data
    root = get_settings().project_root
    ensure_dvc(root)
    report = version_data(root, commit=commit, message="data: new version from the retrain flow")
    get_run_logger().info(report.render())
    return report.md5


@task(name="validate")
def validate_task(instructions: str, md5: str) -> str:
    from skyeye.datagate.gate import run_gate
    result, run_id = run_gate(Path(instructions))
    logger = get_run_logger()
    logger.info("data gate %s for %s (MLflow run %s)", "passed" if result.success else "FAILED", md5, run_id)
    if not result.success:
        raise RuntimeError("data gate failed:\n" + result.render())
    return run_id


@task(name="backbones")
def backbones_task(model_config: str, parent_run: str) -> dict:
    from skyeye.training.jobs import prepare_backbones
    return prepare_backbones(get_settings().project_root / model_config, parent_id=parent_run)


@task(name="stage1")
def stage1_task(model_config: str, stage_config: str, backbones: dict, parent_run: str, num_workers: int) -> str:
    from skyeye.training.jobs import train_stage
    root = get_settings().project_root
    result = train_stage(1, root / model_config, root / stage_config, backbones, parent_id=parent_run,
                         num_workers=num_workers)
    get_run_logger().info("stage 1: run %s, held-out %s", result.run_id,
                          {k: round(v, 1) for k, v in primary_of(result.metrics, HELDOUT).items()})
    return result.model_dir


@task(name="stage2")
def stage2_task(model_config: str, stage_config: str, backbones: dict, stage1_dir: str, parent_run: str,
                num_workers: int) -> str:
    from skyeye.training.jobs import train_stage
    root = get_settings().project_root
    result = train_stage(2, root / model_config, root / stage_config, backbones, init=stage1_dir,
                         parent_id=parent_run, num_workers=num_workers)
    get_run_logger().info("stage 2: run %s, held-out %s", result.run_id,
                          {k: round(v, 1) for k, v in primary_of(result.metrics, HELDOUT).items()})
    return result.model_dir


@task(name="evaluate")
def evaluate_task(model_dir: str, limit: int | None) -> str:
    from skyeye.evaluation.runner import run_evaluation
    result = run_evaluation(model_dir, "all", limit=limit, progress=False)
    get_run_logger().info("evaluation run %s\n%s", result.run_id, result.render())
    return result.run_id


@task(name="register")
def register_task(model_dir: str, eval_run: str) -> int:
    from skyeye.registry.references import model_name
    from skyeye.registry.store import register
    from skyeye.tracking import runs
    from skyeye.tracking.names import TAG_EVAL_TRAINING_RUN, TAG_TUNING_JOB
    tags = runs.client().get_run(eval_run).data.tags
    version = register(model_dir, eval_run, tags.get(TAG_EVAL_TRAINING_RUN) or None, tags.get(TAG_TUNING_JOB) or None)
    get_run_logger().info("registered %s version %d", model_name(), version)
    return version


@task(name="promote")
def promote_task(version: int) -> str:
    """Staging, then production; a refusal is an outcome (the model stays where it got to), not a failure."""
    from skyeye.registry.promotion import PromotionRefused, promote
    logger, reached = get_run_logger(), "none"
    for alias in ("staging", "production"):
        try:
            logger.info(promote(version, alias).render())
            reached = alias
        except PromotionRefused as refused:
            logger.warning("version %d not promoted to %s:\n%s", version, alias, refused)
            break
    return reached


@task(name="serving")
def follow_task(version: int) -> str:
    """On one machine, a running `skyeye serve` follows the production alias by itself: wait
    until it serves the new version."""
    from skyeye.serving import deploy
    from skyeye.serving.config import load_serve_config
    state, logger = deploy.read_state(), get_run_logger()
    if not state or state.get("follows") != "production":
        logger.info("no local server follows production; `skyeye serve` serves version %d", version)
        return "not served (start it with `skyeye serve`)"
    if deploy.wait_for_version(state["url"], version, api_key=os.environ.get(load_serve_config().api_key_env)):
        return f"served at {state['url']}/v1"
    logger.warning("the server at %s did not roll out version %d within 3 minutes", state["url"], version)
    return f"not served: the server at {state['url']} still serves another version"


def serve_production(version: int) -> str:
    """Production moved to `version`: on a cluster (RAY_ADDRESS) the serve flow rolls it out;
    on one machine, the local server that follows production does."""
    if os.environ.get("RAY_ADDRESS"):
        from flows.serve import serve
        return f"served at {serve(model=str(version))['url']}/v1"
    return follow_task(version)


@flow(name="retrain", log_prints=True)
def retrain(data_config: str = "configs/data.yaml", scale: str | None = None, train: bool = True,
            model_file: str = "configs/model/tiny.yaml", stage1_file: str = "configs/train/stage1.yaml",
            stage2_file: str = "configs/train/stage2.yaml", num_workers: int = 2, eval_limit: int | None = None,
            promote: bool = True) -> dict:
    """Synthesize (stand-in for new data arriving) -> build -> version -> validate ->
    backbones -> stage 1 -> stage 2 -> evaluate -> register -> promote."""
    cfg = load_yaml_config(get_settings().project_root / data_config, DataConfig)
    if scale:
        cfg = cfg.model_copy(update={"scale": DataConfig(scale=scale).scale})
    synth_root = synth_task(cfg.scale, cfg.seed)
    instructions = build_task(synth_root, {k: str(v) for k, v in cfg.sources.items()})
    md5 = version_task(instructions, cfg.commit_data)
    validation_run = validate_task(instructions, md5)
    out = {"data_md5": md5, "validation_run": validation_run}
    if train:
        from skyeye.tracking.names import TAG_DVC_MD5
        from skyeye.training.jobs import tuning_job
        # one MLflow parent run holds this job's backbones, stage 1 and stage 2 runs
        with tuning_job("retrain", tags={TAG_DVC_MD5: md5}) as parent:
            backbones = backbones_task(model_file, parent)
            stage1 = stage1_task(model_file, stage1_file, backbones, parent, num_workers)
            stage2 = stage2_task(model_file, stage2_file, backbones, stage1, parent, num_workers)
        out |= {"tuning_run": parent, "stage1_model": stage1, "stage2_model": stage2}
        eval_run = evaluate_task(stage2, eval_limit)
        version = register_task(stage2, eval_run)  # only reached when the evaluation finished
        out |= {"eval_run": eval_run, "model_version": version,
                "alias": promote_task(version) if promote else "none"}
        if out["alias"] == "production":
            out["serving"] = serve_production(version)
    return out


def summary(out: dict) -> str:
    """What a run produced and where to look, for the person who started it."""
    from skyeye.registry.references import model_name
    lines = ["", "retrain finished",
             f"  data version      {out['data_md5']} (gate passed: MLflow run {out['validation_run']})"]
    if "tuning_run" in out:
        lines += [f"  tuning job        MLflow run {out['tuning_run']}",
                  f"  stage-2 model     {out['stage2_model']}",
                  f"  evaluation        MLflow run {out['eval_run']}",
                  f"  registered        {model_name()} version {out['model_version']}, alias reached: {out['alias']}",
                  f"  serving           {out.get('serving', 'unchanged (production did not move)')}"]
    lines += ["look at it:",
              "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000",
              "  PREFECT_HOME=.skyeye/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false "
              ".venv/bin/prefect server start --host 127.0.0.1",
              "  .venv/bin/skyeye models; .venv/bin/skyeye audit --model production",
              "  .venv/bin/skyeye serve   # the production model behind the OpenAI API, http://127.0.0.1:8000/v1"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the retrain flow on the embedded defaults.")
    parser.add_argument("--data-config", default="configs/data.yaml",
                        help="data steps config (relative to the project)")
    parser.add_argument("--scale", choices=["tiny", "demo", "full"], help="override the config's scale")
    parser.add_argument("--data-only", action="store_true", help="stop after the data gate")
    parser.add_argument("--model-config", default="configs/model/tiny.yaml")
    parser.add_argument("--stage1-config", default="configs/train/stage1.yaml")
    parser.add_argument("--stage2-config", default="configs/train/stage2.yaml")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=None, help="samples per bench split (default: all)")
    parser.add_argument("--no-promote", action="store_true", help="register, but move no alias")
    args = parser.parse_args()
    print(summary(retrain(data_config=args.data_config, scale=args.scale, train=not args.data_only,
                          model_file=args.model_config, stage1_file=args.stage1_config,
                          stage2_file=args.stage2_config, num_workers=args.num_workers,
                          eval_limit=args.eval_limit, promote=not args.no_promote)))
