"""Tuning jobs: what `skyeye backbones`, `skyeye train` and the retrain flow run. Each
job is one MLflow parent run in the tuning experiment, with a child run per stage (and
one for a fresh backbones pretraining); checks that need no compute come first, then
Ray Train (or one process) runs the stage loop, then the artifacts are logged.

Only rank 0 logs, into the child run whose id the driver created here.
"""
from __future__ import annotations

# imports inside functions: the loop, Ray Train, the backbones (torch) and matplotlib load only
# when a stage runs or draws
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import WORKERS_PER_STAGE, Settings, get_settings, git_revision
from ..datagate.expectations import validate
from ..datagate.gate import data_version_of, validation_outcome
from ..datagate.leakage import configured
from ..formats.benchmarks import PRIMARY, TASK_OF, VALIDATION, VALIDATION_KEYS, metric, primary_metric
from ..model.config import ModelConfig, load_model_config
from ..model.references import model_folder, training_run_of
from ..model.skyeyegpt import ALIGNMENT_FILE, META_FILE
from ..tracking import runs

if TYPE_CHECKING:  # ray_train imports torch and Ray; jobs imports it where it trains
    from .ray_train import FitResult
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag
from tqdm import tqdm

from ..evaluation.baselines import TRIVIAL
from ..formats.licences import card_licences
from ..tracking.names import (
    DATASET_NAME,
    KIND_BACKBONES,
    KIND_TUNING_JOB,
    KIND_TUNING_STAGE,
    NO_TEST_SPLITS,
    TAG_BACKBONES_DIR,
    TAG_BACKBONES_KEY,
    TAG_DVC_MD5,
    TAG_GIT_COMMIT,
    TAG_GIT_REV,
    TAG_INIT_RUN,
    TAG_KIND,
    TAG_MODEL_DIR,
    TAG_STAGE,
    TAG_TEST_SPLITS_READ,
    TUNING_EXPERIMENT,
    UNCOMMITTED,
    UNVERSIONED,
    licences_tag,
)
from .stage_config import StageConfig, load_stage_config


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


def preflight(stage: int, stage_cfg: StageConfig, instructions: Path, init: str | None, settings: Settings
              ) -> tuple[str | None, str | None]:
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
    md5, rev = data_version_of(Path(instructions), settings)
    outcome = validation_outcome(md5, settings) if md5 else None
    if outcome != "passed":  # never validated (or failed before): check now
        leakage, cache = configured(settings)
        result = validate(Path(instructions), settings.state / "gx-preflight", data_docs=False,
                          leakage=leakage, hash_cache=cache)
        if not result.success:
            raise ValueError(f"{instructions}: the instruction data fails the data gate; not training on it.\n"
                             + result.render())
    return md5, rev


def parent_run(name: str, settings: Settings, tags: dict | None = None) -> str:
    """A RUNNING tuning job (parent run); `tuning_job` also ends it."""
    return runs.create_run(TUNING_EXPERIMENT, name, {TAG_KIND: KIND_TUNING_JOB, **(tags or {})}, settings=settings)


def child_run(parent_id: str, name: str, settings: Settings, tags: dict) -> str:
    """A RUNNING child run of a tuning job."""
    return runs.create_run(TUNING_EXPERIMENT, name, tags, parent=parent_id, settings=settings)


@contextmanager
def tuning_job(name: str, settings: Settings | None = None, tags: dict | None = None) -> Iterator[str]:
    """A tuning job's parent run for the life of the block: FINISHED, or FAILED if a stage failed."""
    with runs.tracked_run(TUNING_EXPERIMENT, name, {TAG_KIND: KIND_TUNING_JOB, **(tags or {})},
                          settings=settings) as run_id:
        yield run_id


def log_data_input(run_id: str, instructions: Path, md5: str | None, rev: str | None) -> None:
    """The data version as the run's dataset input, the DVC hash as its digest. Through the
    client: `mlflow.start_run(run_id=...)` would end the run when its block closes."""
    dataset = MetaDataset(source=LocalArtifactDatasetSource(str(Path(instructions).resolve())),
                          name=DATASET_NAME, digest=md5 or UNVERSIONED)
    tags = [InputTag("mlflow.data.context", "training"), InputTag("dvc_md5", md5 or UNVERSIONED),
            InputTag("git_rev", rev or "")]
    runs.client().log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def loss_curve_png(run_id: str, out: Path) -> Path:
    """Loss, per-task loss and validation primary scores (with their trivial baselines) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = runs.client()
    keys = sorted(client.get_run(run_id).data.metrics)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in [k for k in keys if k == "loss" or k.startswith("loss/")]:
        hist = client.get_metric_history(run_id, key)
        ax1.plot([m.step for m in hist], [m.value for m in hist], label=key, lw=2 if key == "loss" else 1)
    ax1.set(xlabel="step", ylabel="answer-token loss", title="training loss", yscale="log")
    ax1.legend(fontsize=7)
    for key in VALIDATION_KEYS:
        name = VALIDATION + primary_metric(key)
        if name not in keys:
            continue
        hist = client.get_metric_history(run_id, name)
        line, = ax2.plot([m.step for m in hist], [m.value for m in hist], marker="o", label=primary_metric(key))
        trivial = TRIVIAL[TASK_OF[key]]
        base = client.get_metric_history(run_id, VALIDATION + metric(key, PRIMARY[TASK_OF[key]], trivial))
        if base:
            ax2.axhline(base[-1].value, ls="--", color=line.get_color(), lw=1, label=f"{trivial} {key}")
    ax2.set(xlabel="step", ylabel="x100", title="validation samples (dashed: trivial baselines)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@contextmanager
def progress_bar(run_id: str, cfg: StageConfig, desc: str):
    """A driver-side progress bar fed by what rank 0 logs to MLflow (workers stay quiet)."""
    done = threading.Event()
    bar = tqdm(total=cfg.max_steps, desc=desc, unit="step")  # the budget is in steps; the time budget is a safety net

    def poll() -> None:
        client = runs.client()
        while not done.wait(5):
            try:
                metrics = client.get_run(run_id).data.metrics
                history = client.get_metric_history(run_id, "loss") if "loss" in metrics else []
            except Exception:  # noqa: BLE001 - a busy or restarting store must not stop training
                continue
            if not metrics:
                continue
            bar.n = min(max((m.step for m in history), default=0), cfg.max_steps)
            shown = {"loss": round(metrics["loss"], 3)} if "loss" in metrics else {}
            shown |= {key: round(metrics[VALIDATION + primary_metric(key)], 1) for key in VALIDATION_KEYS
                      if VALIDATION + primary_metric(key) in metrics}
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


def _log_params(run_id: str, loop_config: dict, fit: dict) -> None:
    """The resolved config as the stage run's params (before the stage runs)."""
    client = runs.client()
    for key, value in flatten({"model": loop_config["model"], "stage": loop_config["stage"],
                               "fit": fit, "backbones": loop_config["backbones"],
                               "init": loop_config["init"] or ""}).items():
        client.log_param(run_id, key[:250], value[:6000])


def _log_result(run_id: str, model_dir: str, loop_config: dict, seconds: float, result: FitResult) -> None:
    """The trained parts, the resolved config and the loss curves, as the stage run's artifacts;
    with how it ran: worker-group restarts from a checkpoint (a lost worker or node; -1 if
    unknown) and the Ray nodes its workers used."""
    client = runs.client()
    client.set_tag(run_id, TAG_MODEL_DIR, model_dir)
    runs.log_metrics(run_id, {"wall_s": seconds, "startup_s": result.startup_seconds, "restarts": result.restarts,
                              "nodes": result.nodes})
    for name in (ALIGNMENT_FILE, META_FILE):
        client.log_artifact(run_id, str(Path(model_dir) / name), "model")
    for name in ("adapter", "tokenizer"):
        if (Path(model_dir) / name).exists():
            client.log_artifacts(run_id, str(Path(model_dir) / name), f"model/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "resolved_config.json"
        cfg_file.write_text(json.dumps(loop_config, indent=1))
        client.log_artifact(run_id, str(cfg_file))
        client.log_artifact(run_id, str(loss_curve_png(run_id, Path(tmp) / "loss_curve.png")))


def train_stage(stage: int, model_cfg: ModelConfig | str | Path, stage_cfg: StageConfig | str | Path,
                backbones: dict[str, str], *, instructions: Path | None = None, init: str | None = None,
                num_workers: int = WORKERS_PER_STAGE, use_gpu: bool = False, local: bool = False,
                parent_id: str | None = None, settings: Settings | None = None) -> StageResult:
    """One stage as a child run of `parent_id` (or of a tuning job of its own); `init` is the
    stage-1 result stage 2 starts from: a model folder, a tuning-stage run id or a registry URI."""
    from .loop import run_stage
    from .ray_train import FitConfig, fit, fit_local
    s = settings or get_settings()
    runs.setup(s)
    mcfg = model_cfg if isinstance(model_cfg, ModelConfig) else load_model_config(model_cfg)
    scfg = stage_cfg if isinstance(stage_cfg, StageConfig) else load_stage_config(stage_cfg)
    instructions = Path(instructions or s.instructions_dir)
    try:
        init = model_folder(init) if init else None
    except ValueError as err:
        raise ValueError(f"--init {err}") from None
    md5, rev = preflight(stage, scfg, instructions, init, s)
    tags = {TAG_STAGE: str(stage), TAG_KIND: KIND_TUNING_STAGE, TAG_DVC_MD5: md5 or UNVERSIONED,
            TAG_GIT_REV: rev or UNCOMMITTED, TAG_GIT_COMMIT: git_revision(s.project_root) or "none",
            **licences_tag(card_licences(instructions))}  # what a version registered from it inherits
    if init:  # the stage-1 run that wrote the starting folder, so the audit can follow it
        tags[TAG_INIT_RUN] = training_run_of(init) or "unknown"
    loop_config = {"stage": scfg.model_dump(mode="json"), "model": mcfg.model_dump(mode="json"),
                   "instructions": str(instructions.resolve()), "backbones": backbones, "init": init}
    job = nullcontext(parent_id) if parent_id else \
        tuning_job(f"tune-stage{stage}", s, {TAG_DVC_MD5: md5 or UNVERSIONED})
    with job as parent, runs.tracked_run(TUNING_EXPERIMENT, f"stage{stage}", tags, parent=parent, settings=s) as run_id:
        fit_cfg = FitConfig(num_workers=num_workers, use_gpu=use_gpu, run_name=f"stage{stage}-{run_id[:8]}",
                            mlflow_tracking_uri=s.tracking_uri, mlflow_run_id=run_id,
                            storage_path=s.checkpoint_storage)
        _log_params(run_id, loop_config, {"num_workers": num_workers, "use_gpu": use_gpu, "local": local})
        log_data_input(run_id, instructions, md5, rev)
        started = time.perf_counter()
        with progress_bar(run_id, scfg, f"stage {stage}"):
            result = (fit_local if local else fit)(run_stage, loop_config, fit_cfg)
        if result.checkpoint_dir is None:
            raise RuntimeError(f"stage {stage}: training ended without a checkpoint")
        model_dir = str(result.checkpoint_dir)
        _log_result(run_id, model_dir, loop_config, time.perf_counter() - started, result)
        # the loop ran with the test splits sealed (loop.run_stage): none could be opened
        runs.client(s).set_tag(run_id, TAG_TEST_SPLITS_READ, NO_TEST_SPLITS)
    return StageResult(run_id, model_dir, result.metrics)


def prepare_backbones(model_cfg: ModelConfig | str | Path, *, instructions: Path | None = None,
                      synth: Path | None = None, parent_id: str | None = None,
                      settings: Settings | None = None, init: str | Path | None = None) -> dict[str, str]:
    """Backbone folders for this model config: the real ones it names (or, when it names none,
    those of the saved model `init` continues, e.g. an imported SkyEyeGPT), or the tiny ones
    pretrained here (cached by data, config and code; a fresh pretraining is an MLflow run)."""
    from .backbones import build_backbones, cache_key
    s = settings or get_settings()
    mcfg = model_cfg if isinstance(model_cfg, ModelConfig) else load_model_config(model_cfg)
    if mcfg.backbones is None:
        if not (mcfg.vision.name_or_path or mcfg.llm.name_or_path) and init is not None:
            from ..model.skyeyegpt import backbone_paths
            return backbone_paths(init)
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
    md5, rev = data_version_of(instructions, s)
    tags = {TAG_KIND: KIND_BACKBONES, TAG_BACKBONES_KEY: key, TAG_DVC_MD5: md5 or UNVERSIONED}
    job = nullcontext(parent_id) if parent_id else tuning_job("backbones", s)
    with job as parent, runs.tracked_run(TUNING_EXPERIMENT, "backbones", tags, parent=parent, settings=s) as run_id:
        client = runs.client(s)
        for k, v in flatten({"backbones": mcfg.backbones.model_dump(mode="json")}).items():
            client.log_param(run_id, k, v)
        log_data_input(run_id, instructions, md5, rev)
        paths, _ = build_backbones(instructions, synth, cache, mcfg.backbones,
                                   log=lambda metrics, step: runs.log_metrics(run_id, metrics, step, s))
        for name in ("vision", "llm"):
            client.log_artifacts(run_id, paths[name], f"backbones/{name}")
        client.set_tag(run_id, TAG_BACKBONES_DIR, str(cache / key))
    return paths
