"""The `retrain` flow: DVC-versioned data -> Great Expectations gate -> backbones ->
two-stage tuning on Ray (stage 1, stage 2) -> evaluation on the 8 benchmarks -> registry
-> promotion (staging, then production when the policy allows).

Thin: each task calls one `skyeye` function and passes paths and hashes, never live
objects. Run it with `python -m flows.retrain` (or `make demo`); with no
PREFECT_API_URL, Prefect starts its temporary local server.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from skyeye.config import (
    DEFAULT_MODEL_FILE,
    STAGE_FILE,
    WORKERS_PER_STAGE,
    DataConfig,
    ScaleName,
    configure_environment,
    get_settings,
    load_yaml_config,
)
from skyeye.formats.benchmarks import VALIDATION, primary_of

configure_environment()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from flows import reports  # noqa: E402
from flows.caching import (  # noqa: E402
    StepKey,
    folder_stamp,
    folder_there,
    paths_there,
    production_agrees,
    production_holder,
    retry_transient,
    run_there,
    version_there,
)

# transient failures (a busy SQLite store, a Ray start-up timeout) retry; a failed gate, a
# refused promotion or a bug does not (flows/caching.py: transient)
RETRY = {"retries": 2, "retry_delay_seconds": 10, "retry_condition_fn": retry_transient}


def step(name: str, key: StepKey | None):
    """A retrain task, reused when its key matches (None: always run, as the checks are)."""
    return task(name=name, cache_policy=key or NONE, persist_result=key is not None, **RETRY)


@step("synth", StepKey(inputs=("scale", "seed"), still_there=folder_there))
def synth_task(scale: str, seed: int) -> str:
    from skyeye.synth.corpus import synthesize
    out = get_settings().synth_dir
    summary = synthesize(out, scale=scale, seed=seed, progress=False)
    get_run_logger().info("SkyEye-Synth %s: %s", scale, summary)
    return str(out)


def source_stamps(inputs: dict) -> dict:
    """What a build reads beyond its root: each source's folder or LLaVA file, and a LLaVA set's images."""
    def stamp(path: str | None) -> str | None:
        if not path:
            return None
        p = Path(path)
        return folder_stamp(p) if p.is_dir() else f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else "-"
    return {name: [stamp(spec.get("path")), stamp(spec.get("images"))]
            for name, spec in (inputs.get("sources") or {}).items()}


@step("build", StepKey(inputs=("root", "sources", "leakage"), folders=("root",), reads=source_stamps,
                       still_there=folder_there))
def build_task(root: str, sources: dict[str, dict], leakage: dict) -> str:
    from skyeye.config import LeakageConfig, SourceConfig
    from skyeye.data.instructions import build
    from skyeye.datagate.leakage import CACHE_FILE
    s = get_settings()
    out = s.instructions_dir
    card = build(Path(root), out, {k: SourceConfig.model_validate(v) for k, v in sources.items()},
                 leakage=LeakageConfig.model_validate(leakage), hash_cache=s.state / CACHE_FILE)
    get_run_logger().info("instructions: stage1=%d stage2=%d; leakage: %d pairs, dropped %s",
                          card["stage1"]["total"], card["stage2"]["total"], len(card["leakage"]["pairs"]),
                          card["leakage"]["dropped"])
    return str(out)


@step("version", None)  # the check that says whether the data changed: always run (DVC skips unchanged files)
def version_task(instructions: str, commit: bool) -> str:
    from skyeye.datagate.versioning import ensure_dvc, version_data
    root = get_settings().project_root
    ensure_dvc(root)
    report = version_data(root, commit=commit, message="data: new version from the retrain flow")
    get_run_logger().info(report.render())
    return report.md5


@step("validate", StepKey(inputs=("md5", "leakage"), still_there=run_there))
def validate_task(instructions: str, md5: str, leakage: dict) -> str:
    from skyeye.config import LeakageConfig
    from skyeye.datagate.gate import GateFailed, run_gate
    result, run_id = run_gate(Path(instructions), leakage=LeakageConfig.model_validate(leakage))
    get_run_logger().info("data gate %s for %s (MLflow run %s)", "passed" if result.success else "FAILED", md5,
                          run_id)
    if not result.success:
        raise GateFailed(result, run_id)
    return run_id


@step("backbones", StepKey(inputs=("md5",), configs=("model_config",), still_there=paths_there))
def backbones_task(model_config: str, md5: str, parent_run: str) -> dict:
    from skyeye.training.jobs import prepare_backbones
    return prepare_backbones(get_settings().project_root / model_config, parent_id=parent_run)


@step("stage1", StepKey(inputs=("md5", "backbones", "num_workers"), configs=("model_config", "stage_config"),
                        still_there=folder_there))
def stage1_task(model_config: str, stage_config: str, backbones: dict, md5: str, parent_run: str,
                num_workers: int) -> str:
    from skyeye.training.jobs import train_stage
    root = get_settings().project_root
    result = train_stage(1, root / model_config, root / stage_config, backbones, parent_id=parent_run,
                         num_workers=num_workers)
    get_run_logger().info("stage 1: run %s, validation %s", result.run_id,
                          {k: round(v, 1) for k, v in primary_of(result.metrics, VALIDATION).items()})
    return result.model_dir


@step("stage2", StepKey(inputs=("md5", "backbones", "stage1_dir", "num_workers"),
                        configs=("model_config", "stage_config"), still_there=folder_there))
def stage2_task(model_config: str, stage_config: str, backbones: dict, stage1_dir: str, md5: str, parent_run: str,
                num_workers: int) -> str:
    from skyeye.training.jobs import train_stage
    root = get_settings().project_root
    result = train_stage(2, root / model_config, root / stage_config, backbones, init=stage1_dir,
                         parent_id=parent_run, num_workers=num_workers)
    get_run_logger().info("stage 2: run %s, validation %s", result.run_id,
                          {k: round(v, 1) for k, v in primary_of(result.metrics, VALIDATION).items()})
    return result.model_dir


@step("evaluate", StepKey(inputs=("model_dir", "md5", "limit"), still_there=run_there))
def evaluate_task(model_dir: str, md5: str, limit: int | None, num_workers: int = 1) -> str:
    # num_workers is not in the key: sharded or not, the scores are the same
    from skyeye.evaluation.runner import run_evaluation
    result = run_evaluation(model_dir, "all", limit=limit, progress=False, num_workers=num_workers)
    get_run_logger().info("evaluation run %s\n%s", result.run_id, result.render())
    return result.run_id


@step("register", StepKey(inputs=("model_dir", "eval_run"), still_there=version_there))
def register_task(model_dir: str, eval_run: str) -> int:
    from skyeye.model.references import model_name
    from skyeye.registry.store import register
    from skyeye.tracking import runs
    from skyeye.tracking.names import TAG_EVAL_TRAINING_RUN, TAG_TUNING_JOB
    tags = runs.client().get_run(eval_run).data.tags
    version = register(model_dir, eval_run, tags.get(TAG_EVAL_TRAINING_RUN) or None, tags.get(TAG_TUNING_JOB) or None)
    get_run_logger().info("registered %s version %d", model_name(), version)
    return version


@step("promote", StepKey(inputs=("version",), configs=("policy_file",), reads=production_holder,
                         still_there=production_agrees))
def promote_task(version: int, policy_file: str) -> dict:
    """Staging, then production; a refusal is an outcome (the model stays where it got to), not a failure."""
    from skyeye.registry.promotion import PromotionRefused, load_policy, promote
    logger, reached, decisions = get_run_logger(), "none", []
    path = get_settings().project_root / policy_file
    policy = load_policy(path if path.exists() else None)  # none in the project: the shipped policy
    for alias in ("staging", "production"):
        try:
            decisions.append(promote(version, alias, policy=policy).render())
            logger.info(decisions[-1])
            reached = alias
        except PromotionRefused as refused:
            decisions.append(f"not promoted to {alias}:\n{refused}")
            logger.warning("version %d %s", version, decisions[-1])
            break
    return {"alias": reached, "version": version, "decisions": decisions}


WHERE_TO_LOOK = {
    "validate": "the validation run in MLflow (experiment skyeye-data-validation) holds the Data Docs",
    "backbones": "the tuning job's runs in MLflow; Ray's logs under /tmp/ray/session_latest/logs",
    "stage1": "the tuning job's stage1 run in MLflow; Ray's logs under /tmp/ray/session_latest/logs",
    "stage2": "the tuning job's stage2 run in MLflow; Ray's logs under /tmp/ray/session_latest/logs",
    "evaluate": "the evaluation run in MLflow (experiment skyeye-evaluation)",
}


class StepFailed(RuntimeError):
    """A step of retrain failed: the flow run ends Failed with this message, nothing after it runs."""


def run_step(steps: dict[str, str], force: bool, step_task, *args, **kwargs):
    """Run one step (recomputed when `force`), note whether it was reused, and turn its
    failure into the flow's, naming the step and where to look."""
    chosen = step_task.with_options(refresh_cache=True) if force else step_task
    state = chosen(*args, return_state=True, **kwargs)
    steps[step_task.name] = "reused" if state.name == "Cached" else "ran"
    if not state.is_completed():
        err = state.result(raise_on_failure=False)
        where = WHERE_TO_LOOK.get(step_task.name, "the flow run's logs")
        raise StepFailed(f"{step_task.name} failed: {err}\nwhere to look: {where}")
    return state.result()


def _flag(flag: str | None, help: str | None = None) -> dict:
    """How a parameter appears on `python -m flows.retrain`: its flag (None: not there) and, for a
    flag that turns a default-on parameter off, what the flag does."""
    return {"flag": flag, "help": help}


class RetrainParams(BaseModel):
    """The retrain flow's parameters, in one typed place: the flow's signature takes its defaults
    from here and `python -m flows.retrain` its flags, defaults and help (`add_arguments`).
    Paths are relative to the project."""
    model_config = ConfigDict(extra="forbid")
    data_config: str = Field("configs/data.yaml", description="data steps config")
    scale: ScaleName | None = Field(None, description="override the data config's scale")
    train: bool = Field(True, description="after the data gate: backbones, both stages, evaluate, register, promote",
                        json_schema_extra=_flag("--data-only", "stop after the data gate"))
    model_file: str = Field(DEFAULT_MODEL_FILE, description="model config", json_schema_extra=_flag("--model-config"))
    stage1_file: str = Field(STAGE_FILE.format(stage=1), description="stage-1 config",
                             json_schema_extra=_flag("--stage1-config"))
    stage2_file: str = Field(STAGE_FILE.format(stage=2), description="stage-2 config",
                             json_schema_extra=_flag("--stage2-config"))
    num_workers: int = Field(WORKERS_PER_STAGE, description="Ray Train workers per stage")
    eval_limit: int | None = Field(None, description="samples per bench split (default: all)")
    promote: bool = Field(True, description="move staging, then production, as the policy allows",
                          json_schema_extra=_flag("--no-promote", "register, but move no alias"))
    force: bool = Field(False, description="recompute every step, reusing nothing")
    expected_md5: str | None = Field(None, description="the data version an event announced",
                                     json_schema_extra=_flag(None))
    rollout: bool = Field(True, description="serve a new production at the end",
                          json_schema_extra=_flag("--no-rollout", "do not serve a new production at the end"))
    eval_workers: int = Field(1, description="Ray workers the evaluation is sharded over")


DEFAULTS = RetrainParams()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of RetrainParams, its destination the field's name: a bool that is on by
    default is turned off by its flag, a Literal gives the choices, the default is the field's."""
    for name, field in RetrainParams.model_fields.items():
        cli = field.json_schema_extra or {}
        flag = cli.get("flag", "--" + name.replace("_", "-"))
        if flag is None:
            continue
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_false" if field.default else "store_true",
                                help=cli.get("help") or field.description)
            continue
        kind = next(t for t in get_args(field.annotation) or (field.annotation,) if t is not type(None))
        choices = get_args(kind) if get_origin(kind) is Literal else None
        shown = "" if field.default is None else f" (default: {field.default})"
        parser.add_argument(flag, dest=name, type=type(choices[0]) if choices else kind, choices=choices,
                            default=field.default, help=f"{field.description}{shown}")


@flow(name="retrain", log_prints=True)
def retrain(data_config: str = DEFAULTS.data_config, scale: str | None = DEFAULTS.scale, train: bool = DEFAULTS.train,
            model_file: str = DEFAULTS.model_file, stage1_file: str = DEFAULTS.stage1_file,
            stage2_file: str = DEFAULTS.stage2_file, num_workers: int = DEFAULTS.num_workers,
            eval_limit: int | None = DEFAULTS.eval_limit, promote: bool = DEFAULTS.promote,
            force: bool = DEFAULTS.force, expected_md5: str | None = DEFAULTS.expected_md5,
            rollout: bool = DEFAULTS.rollout, eval_workers: int = DEFAULTS.eval_workers) -> dict:
    """Synthesize (stand-in for new data arriving) -> build -> version -> validate ->
    backbones -> stage 1 -> stage 2 -> evaluate -> register -> promote. Each step is reused
    when what determines it is unchanged (`force` recomputes all); `expected_md5` is the data
    version an event announced (logged when the data found differs); `rollout` serves a new
    production at the end; `eval_workers` > 1 shards the evaluation over that many Ray workers."""
    settings, steps = get_settings(), {}
    cfg = load_yaml_config(settings.project_root / data_config, DataConfig)
    if scale:
        cfg = cfg.model_copy(update={"scale": DataConfig(scale=scale).scale})
    synth_root = run_step(steps, force, synth_task, cfg.scale, cfg.seed)
    leakage = cfg.leakage.model_dump()
    instructions = run_step(steps, force, build_task, synth_root,
                            {k: v.model_dump(mode="json", exclude_defaults=True)
                             for k, v in cfg.source_configs().items()}, leakage)
    md5 = run_step(steps, force, version_task, instructions, cfg.commit_data)
    if expected_md5 and expected_md5 != md5:
        get_run_logger().warning("started for data version %s; the data here is %s", expected_md5, md5)
    validation_run = run_step(steps, force, validate_task, instructions, md5, leakage)
    out = {"data_md5": md5, "validation_run": validation_run, "steps": steps}
    reports.data_artifact(md5, validation_run)
    if train:
        from skyeye.tracking import runs
        from skyeye.tracking.names import TAG_DVC_MD5, TAG_TUNING_JOB
        from skyeye.training.jobs import tuning_job
        # one MLflow parent run holds this job's backbones, stage 1 and stage 2 runs
        with tuning_job("retrain", tags={TAG_DVC_MD5: md5}) as parent:
            backbones = run_step(steps, force, backbones_task, model_file, md5, parent)
            stage1 = run_step(steps, force, stage1_task, model_file, stage1_file, backbones, md5, parent, num_workers)
            stage2 = run_step(steps, force, stage2_task, model_file, stage2_file, backbones, stage1, md5, parent,
                              num_workers)
        out |= {"tuning_run": parent, "stage1_model": stage1, "stage2_model": stage2}
        eval_run = run_step(steps, force, evaluate_task, stage2, md5, eval_limit, eval_workers)
        if all(steps[s] == "reused" for s in ("backbones", "stage1", "stage2")):
            runs.client().delete_run(parent)  # nothing ran in it: the job that trained this model is the one
            out["tuning_run"] = runs.client().get_run(eval_run).data.tags.get(TAG_TUNING_JOB, parent)
        version = run_step(steps, force, register_task, stage2, eval_run)  # only reached when evaluation finished
        from skyeye.model.references import production_version
        production_before = production_version()
        reports.scoreboard_artifact(version, production_before)
        decision = run_step(steps, force, promote_task, version, str(settings.promotion_policy)) if promote \
            else {"alias": "none", "decisions": ["not asked to promote (--no-promote)"]}
        out |= {"eval_run": eval_run, "model_version": version, "alias": decision["alias"]}
        reports.promotion_artifact(out, decision["decisions"])
        if out["alias"] == "production" and rollout:  # deployed runs leave it to the production watcher
            from flows.serve import rollout as rollout_flow
            out["serving"] = rollout_flow(version)
    return out


def check_configs(data_config: str, model_file: str | None, stage_files: tuple[str, ...] = ()) -> None:
    """Load the configs the steps will read, before the flow starts: a bad one is a ValueError
    naming its file, ahead of Prefect's server and every step."""
    from skyeye.model.config import load_model_config
    from skyeye.training.stage_config import load_stage_config
    root = get_settings().project_root
    load_yaml_config(root / data_config, DataConfig)
    if model_file:
        load_model_config(root / model_file)
    for stage_file in stage_files:
        load_stage_config(root / stage_file)


def summary(out: dict) -> str:
    """What a run produced and where to look, for the person who started it."""
    from skyeye.model.references import model_name
    lines = ["", "retrain finished",
             f"  data version      {out['data_md5']} (gate passed: MLflow run {out['validation_run']})"]
    if "tuning_run" in out:
        lines += [f"  tuning job        MLflow run {out['tuning_run']}",
                  f"  stage-2 model     {out['stage2_model']}",
                  f"  evaluation        MLflow run {out['eval_run']}",
                  f"  registered        {model_name()} version {out['model_version']}, alias reached: {out['alias']}",
                  f"  serving           {out.get('serving', 'unchanged (production did not move)')}"]
    steps = out.get("steps", {})
    reused = [name for name, how in steps.items() if how == "reused"]
    lines.append(f"  steps reused      {', '.join(reused) or 'none'}"
                 + (f"; ran: {', '.join(n for n in steps if n not in reused)}" if len(reused) < len(steps) else ""))
    lines += ["look at it:",
              "  .venv/bin/skyeye server up      # the Prefect UI and the MLflow UI on loopback, with their URLs",
              "  .venv/bin/skyeye models; .venv/bin/skyeye audit --model production",
              "  .venv/bin/skyeye serve          # the production model behind the OpenAI API, http://127.0.0.1:8000/v1",
              "  .venv/bin/skyeye schedule up    # retrain weekly, on new data; serve what production becomes"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the retrain flow on the embedded defaults.")
    add_arguments(parser)
    params = RetrainParams.model_validate(vars(parser.parse_args()))
    from skyeye.commands.errors import exit_on_error
    with exit_on_error():  # a failure in a line or two, as `skyeye` reports it (SKYEYE_DEBUG=1: the traceback)
        check_configs(params.data_config, params.model_file if params.train else None,
                      (params.stage1_file, params.stage2_file) if params.train else ())
        print(summary(retrain(**params.model_dump())))
