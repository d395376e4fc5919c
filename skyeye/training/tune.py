"""Two-stage tuning jobs: preflight checks, MLflow parent/child runs, Ray Train (or one
process), artifacts. Refuses a job that cannot work before any compute starts.

One parent run per tuning job, one child run per stage (and one for the backbones);
only rank 0 logs, into the child run whose id the driver created.
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient  # noqa: I001

from .. import tracking
from ..config import Settings, get_settings, git_revision
from ..model.config import ModelConfig, load_model_config
from ..model.skyeyegpt import META_FILE
from .stage_config import StageConfig, load_stage_config

TUNING_EXPERIMENT = "skyeye-tuning"
TAG_STAGE = "skyeye.stage"
TAG_MODEL_DIR = "skyeye.model_dir"
TAG_KIND = "skyeye.kind"


@dataclass
class StageResult:
    run_id: str
    model_dir: str  # a loadable SkyEyeGPT folder (the final checkpoint)
    metrics: dict


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def preflight(stage: int, stage_cfg: StageConfig, instructions: Path, init: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """Checks that need no compute: the stage matches, stage 2 has a stage-1 result, the
    instruction file exists and passed the data gate. Returns (data md5, git rev)."""
    if stage_cfg.stage != stage:
        raise ValueError(f"stage config says stage {stage_cfg.stage}, but stage {stage} was asked for")
    for name in filter(None, (stage_cfg.data, stage_cfg.replay)):
        data_file = Path(instructions) / name
        if not data_file.exists():
            raise ValueError(f"{data_file}: instruction file not found (run `skyeye data build`)")
    if stage == 2:
        if not init:
            raise ValueError("stage 2 needs a stage-1 result: pass --init <stage-1 model folder or MLflow run id>")
        if not (Path(init) / META_FILE).exists():
            raise ValueError(f"--init {init}: not a saved SkyEyeGPT (no {META_FILE}); give a stage-1 result")
    from ..gate import data_version_of
    md5, rev = data_version_of(Path(instructions), settings)
    outcome = tracking.validation_outcome(md5, settings) if md5 else None
    if outcome != "passed":
        from ..validation import validate  # never validated (or failed before): check now
        result = validate(Path(instructions), settings.state / "gx-preflight", data_docs=False)
        if not result.success:
            raise ValueError(f"{instructions}: the instruction data fails the data gate; not training on it.\n"
                             + result.render())
    return md5, rev


def resolve_init(init: str | None) -> str | None:
    """A model folder as is; an MLflow run id -> the model folder that run recorded."""
    if not init or Path(init).exists():
        return init
    try:
        run = MlflowClient().get_run(init)
    except Exception:
        raise ValueError(f"--init {init}: neither a folder nor an MLflow run id") from None
    folder = run.data.tags.get(TAG_MODEL_DIR)
    if not folder:
        raise ValueError(f"--init {init}: run has no {TAG_MODEL_DIR} tag (not a tuning stage run)")
    return folder


def run_of_model_dir(folder: str | Path) -> str | None:
    """The tuning-stage run that wrote a model folder (the inverse of `resolve_init`)."""
    exp = MlflowClient().get_experiment_by_name(TUNING_EXPERIMENT)
    found = MlflowClient().search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_MODEL_DIR}` = '{folder}'",
                                       max_results=1) if exp else []
    return found[0].info.run_id if found else None


def parent_run(name: str, settings: Settings, tags: dict | None = None) -> str:
    tracking.setup(settings)
    exp = tracking.experiment_id(TUNING_EXPERIMENT, settings)
    run = MlflowClient().create_run(exp, run_name=name, tags={TAG_KIND: "tuning-job", **(tags or {})})
    return run.info.run_id


def end_job(parent_id: str, status: str = "FINISHED") -> None:
    """Close a tuning job's parent run once its stages are done (or one failed)."""
    MlflowClient().set_terminated(parent_id, status)


def child_run(parent_id: str, name: str, settings: Settings, tags: dict) -> str:
    exp = tracking.experiment_id(TUNING_EXPERIMENT, settings)
    run = MlflowClient().create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent_id, **tags})
    return run.info.run_id


def log_data_input(run_id: str, instructions: Path, md5: str | None, rev: str | None) -> None:
    """The data version as the run's dataset input, the DVC hash as its digest. Through the
    client: `mlflow.start_run(run_id=...)` would end the run when its block closes."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    dataset = MetaDataset(source=LocalArtifactDatasetSource(str(Path(instructions).resolve())),
                          name="skyeye-instructions", digest=md5 or "unversioned")
    tags = [InputTag("mlflow.data.context", "training"), InputTag("dvc_md5", md5 or "unversioned"),
            InputTag("git_rev", rev or "")]
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def loss_curve_png(run_id: str, out: Path) -> Path:
    """Loss, per-task loss and held-out scores against step, from the run's metric history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    client = MlflowClient()
    keys = sorted(client.get_run(run_id).data.metrics)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in [k for k in keys if k == "loss" or k.startswith("loss/")]:
        hist = client.get_metric_history(run_id, key)
        ax1.plot([m.step for m in hist], [m.value for m in hist], label=key, lw=2 if key == "loss" else 1)
    ax1.set(xlabel="step", ylabel="answer-token loss", title="training loss", yscale="log")
    ax1.legend(fontsize=7)
    for key in [k for k in keys if k.startswith("heldout/") and k.split("/")[1] in
                ("grounding_acc05", "vqa_aa", "caption_cider")]:
        hist = client.get_metric_history(run_id, key)
        line, = ax2.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=key)
        base = client.get_metric_history(run_id, key.replace("heldout/", "baseline/").replace("vqa_aa", "vqa_aa"))
        if base:
            ax2.axhline(base[-1].value, ls="--", color=line.get_color(), lw=1, label=f"baseline {key.split('/')[1]}")
    ax2.set(xlabel="step", title="held-out test samples")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@contextmanager
def progress_bar(run_id: str, cfg: StageConfig, desc: str):
    """A driver-side progress bar fed by what rank 0 logs to MLflow (workers stay quiet)."""
    from tqdm import tqdm
    done = threading.Event()
    total = int(cfg.time_budget_s) if cfg.time_budget_s else cfg.max_steps
    bar = tqdm(total=total, desc=desc, unit="s" if cfg.time_budget_s else "step")

    def poll() -> None:
        client = MlflowClient()
        while not done.wait(5):
            try:
                metrics = client.get_run(run_id).data.metrics
            except Exception:  # a busy store must not stop training
                continue
            if not metrics:
                continue
            bar.n = min(int(metrics.get("elapsed_s", 0)) if cfg.time_budget_s else
                        len(client.get_metric_history(run_id, "loss")) * cfg.log_every, total)
            shown = {k.split("/")[-1]: round(v, 3) for k, v in metrics.items()
                     if k in ("loss", "heldout/grounding_acc05", "heldout/vqa_aa", "heldout/caption_cider")}
            bar.set_postfix(shown, refresh=False)
            bar.refresh()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        done.set()
        thread.join(timeout=10)
        bar.close()


def train_stage(stage: int, model_cfg: ModelConfig | str | Path, stage_cfg: StageConfig | str | Path,
                backbones: dict[str, str], *, instructions: Path | None = None, init: str | None = None,
                num_workers: int = 2, use_gpu: bool = False, local: bool = False, parent_id: str | None = None,
                settings: Settings | None = None) -> StageResult:
    from .loop import run_stage
    from .ray_train import FitConfig, fit, fit_local
    s = settings or get_settings()
    tracking.setup(s)
    mcfg = model_cfg if isinstance(model_cfg, ModelConfig) else load_model_config(model_cfg)
    scfg = stage_cfg if isinstance(stage_cfg, StageConfig) else load_stage_config(stage_cfg)
    instructions = Path(instructions or s.instructions_dir)
    init = resolve_init(init)
    md5, rev = preflight(stage, scfg, instructions, init, s)
    own_parent = parent_id is None  # a job of its own: this call also ends the parent run
    parent_id = parent_id or parent_run(f"tune-stage{stage}", s, {"skyeye.data.dvc_md5": md5 or "unversioned"})
    tags = {TAG_STAGE: str(stage), TAG_KIND: "tuning-stage", "skyeye.data.dvc_md5": md5 or "unversioned",
            "skyeye.data.git_rev": rev or "uncommitted", "skyeye.git_commit": git_revision(s.project_root) or "none"}
    if init:  # the stage-1 run that wrote the starting folder, so the audit can follow it
        tags["skyeye.init_run"] = run_of_model_dir(init) or "unknown"
    run_id = child_run(parent_id, f"stage{stage}", s, tags)
    fit_cfg = FitConfig(num_workers=num_workers, use_gpu=use_gpu, run_name=f"stage{stage}-{run_id[:8]}",
                        mlflow_tracking_uri=s.tracking_uri, mlflow_run_id=run_id,
                        storage_path=str(s.state / "ray_results"))
    loop_config = {"stage": scfg.model_dump(mode="json"), "model": mcfg.model_dump(mode="json"),
                   "instructions": str(instructions.resolve()), "backbones": backbones, "init": init}
    client = MlflowClient()
    for key, value in flatten({"model": loop_config["model"], "stage": loop_config["stage"],
                               "fit": {"num_workers": num_workers, "use_gpu": use_gpu, "local": local},
                               "backbones": backbones, "init": init or ""}).items():
        client.log_param(run_id, key[:250], value[:6000])
    log_data_input(run_id, instructions, md5, rev)
    started = time.perf_counter()
    try:
        with progress_bar(run_id, scfg, f"stage {stage}"):
            result = (fit_local if local else fit)(run_stage, loop_config, fit_cfg)
        if result.checkpoint_dir is None:
            raise RuntimeError(f"stage {stage}: training ended without a checkpoint")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        if own_parent:
            client.set_terminated(parent_id, "FAILED")
        raise
    model_dir = str(result.checkpoint_dir)
    client.set_tag(run_id, TAG_MODEL_DIR, model_dir)
    client.log_metric(run_id, "wall_s", time.perf_counter() - started)
    client.log_metric(run_id, "startup_s", result.startup_seconds)
    for name in ("alignment_layer.pt", META_FILE):
        client.log_artifact(run_id, str(Path(model_dir) / name), "model")
    for name in ("adapter", "tokenizer"):
        if (Path(model_dir) / name).exists():
            client.log_artifacts(run_id, str(Path(model_dir) / name), f"model/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "resolved_config.json"
        cfg_file.write_text(json.dumps(loop_config, indent=1))
        client.log_artifact(run_id, str(cfg_file))
        client.log_artifact(run_id, str(loss_curve_png(run_id, Path(tmp) / "loss_curve.png")))
    client.set_terminated(run_id, "FINISHED")
    if own_parent:
        client.set_terminated(parent_id, "FINISHED")
    return StageResult(run_id, model_dir, result.metrics)


def prepare_backbones(model_cfg: ModelConfig | str | Path, *, instructions: Path | None = None,
                      synth: Path | None = None, parent_id: str | None = None,
                      settings: Settings | None = None) -> dict[str, str]:
    """Backbone folders for this model config: the real ones it names, or the tiny ones
    pretrained here (cached by data and config; a fresh pretraining is an MLflow run)."""
    from .backbones import build_backbones, cache_key
    s = settings or get_settings()
    mcfg = model_cfg if isinstance(model_cfg, ModelConfig) else load_model_config(model_cfg)
    if mcfg.backbones is None:
        if not (mcfg.vision.name_or_path and mcfg.llm.name_or_path):
            raise ValueError("model config: without a `backbones` section, vision.name_or_path and "
                             "llm.name_or_path must name real backbones")
        return {"vision": mcfg.vision.name_or_path, "llm": mcfg.llm.name_or_path,
                "tokenizer": mcfg.llm.tokenizer or mcfg.llm.name_or_path}
    instructions = Path(instructions or s.instructions_dir)
    synth = Path(synth or s.synth_dir)
    cache = s.state / "backbones"
    key = cache_key(instructions, mcfg.backbones)
    if (cache / key / "COMPLETE").exists():
        paths, _ = build_backbones(instructions, synth, cache, mcfg.backbones)
        return paths
    tracking.setup(s)
    from ..gate import data_version_of
    md5, rev = data_version_of(instructions, s)
    parent_id = parent_id or parent_run("backbones", s)
    run_id = child_run(parent_id, "backbones", s, {TAG_KIND: "backbones", "skyeye.backbones.key": key,
                                                   "skyeye.data.dvc_md5": md5 or "unversioned"})
    client = MlflowClient()
    for k, v in flatten({"backbones": mcfg.backbones.model_dump(mode="json")}).items():
        client.log_param(run_id, k, v)
    log_data_input(run_id, instructions, md5, rev)

    def log(metrics: dict, step: int) -> None:
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step)
                                          for k, v in metrics.items()])
    try:
        paths, _ = build_backbones(instructions, synth, cache, mcfg.backbones, log=log)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    for name in ("vision", "llm"):
        client.log_artifacts(run_id, paths[name], f"backbones/{name}")
    client.set_tag(run_id, "skyeye.backbones.dir", str(cache / key))
    client.set_terminated(run_id, "FINISHED")
    return paths
