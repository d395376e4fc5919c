"""`skyeye evaluate`: the 8 benchmarks with the paper's prompts and metric conventions,
SkyEyeGPT and its baselines scored the same way, everything in one MLflow run.

Metric names are `<bench_split>/<metric>` on the paper's x100 scale; a baseline's are
`baseline.<name>/<bench_split>/<metric>`. The run ends FINISHED only when every
benchmark was scored, so the registry never sees a half evaluation.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict

from .. import tracking
from ..config import Settings, get_settings, git_revision
from ..data.records import DataFormatError, read_json
from ..metrics import CaptionScorer, caption_scores, grounding_scores, vqa_scores
from ..training.data import load_items
from .benchmarks import BENCHMARK_OF, PRIMARY, TASK_OF, select
from .predictors import ModelPredictor, centred_boxes, majority_answers, nearest_captions

EVAL_EXPERIMENT = "skyeye-evaluation"
BASELINES = ("untuned", "majority_answer", "centred_box", "nearest_caption")
# which trivial baseline applies to which task (the untuned model answers everything)
TRIVIAL = {"vqa": "majority_answer", "grounding": "centred_box", "caption": "nearest_caption"}
REQUIRED = {"caption": ("references",), "vqa": ("question_type", "answer", "prompt"),
            "grounding": ("box", "image_size", "prompt")}


class EvalConfig(BaseModel):
    """Evaluation defaults (the one typed place for them)."""
    model_config = ConfigDict(extra="forbid")
    batch_size: int = 32
    # an answer's length budget per task: short answers keep a babbling model cheap to score
    max_new_tokens: dict[str, int] = {"caption": 40, "vqa": 8, "grounding": 16}
    limit: int | None = None  # samples per bench split (None = all)
    # the untuned model babbles to its answer budget: scored on a spread subset, it costs a
    # fraction of the time and still shows where tuning started (its scores are ~0)
    untuned_limit: int | None = 100
    baselines: tuple[str, ...] = BASELINES
    examples: int = 8  # grounding examples drawn in the report


@dataclass
class EvalResult:
    run_id: str
    metrics: dict[str, float]
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0

    def render(self) -> str:
        lines = [f"evaluation run {self.run_id} ({self.seconds:.0f} s)", f"{'bench split':24s} {'metric':12s} "
                 f"{'ours':>8s}  baselines"]
        for key in self.predictions:
            metric = PRIMARY[TASK_OF[key]]
            base = {b: self.metrics.get(f"baseline.{b}/{key}/{metric}") for b in BASELINES}
            shown = "  ".join(f"{b}={v:.1f}" for b, v in base.items() if v is not None)
            lines.append(f"{key:24s} {metric:12s} {self.metrics[f'{key}/{metric}']:8.1f}  {shown}")
        lines.append(f"primary_score {self.metrics['primary_score']:.2f}")
        return "\n".join(lines)


def load_eval_file(instructions: Path, key: str) -> dict:
    """One evaluation file, checked against the benchmark it claims to be."""
    path = Path(instructions) / "eval" / f"{key}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: evaluation file not found (run `skyeye data build`)")
    ev = read_json(path)
    bench, split = BENCHMARK_OF[key], key[len(BENCHMARK_OF[key]) + 1:]
    if not isinstance(ev, dict) or ev.get("benchmark") != bench or ev.get("split") != split:
        got = (ev.get("benchmark"), ev.get("split")) if isinstance(ev, dict) else type(ev).__name__
        raise DataFormatError(path, "benchmark/split", f"holds {got}, expected {bench!r} {split!r}")
    rows = ev.get("samples")
    if not isinstance(rows, list) or not rows:
        raise DataFormatError(path, "samples", "must be a non-empty list")
    need = REQUIRED[TASK_OF[key]] + ("id",)
    seen: set = set()
    for i, row in enumerate(rows):
        if row.get("id") in seen:
            raise DataFormatError(path, f"samples[{i}].id", f"duplicate id {row['id']!r}")
        seen.add(row.get("id"))
        missing = [f for f in need if f not in row] + ([] if ("image" in row or "video" in row) else ["image"])
        if missing:
            raise DataFormatError(path, f"samples[{i}]", f"lacks {missing} (a {TASK_OF[key]} benchmark needs them)")
    return ev


def score(key: str, rows: list[dict], answers: list[str], scorer: CaptionScorer | None = None) -> dict[str, float]:
    """The paper's metrics for one bench split (a shared CaptionScorer keeps one METEOR process)."""
    task = TASK_OF[key]
    if task == "caption":
        refs = [r["references"] for r in rows]
        return scorer.score(answers, refs) if scorer else caption_scores(answers, refs)
    if task == "vqa":
        return vqa_scores(answers, [r["answer"] for r in rows], [r["question_type"] for r in rows])
    return grounding_scores(answers, [tuple(r["box"]) for r in rows], [tuple(r["image_size"]) for r in rows])


def _spread(rows: list, n: int | None) -> list:
    if not n or len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def evaluate(model, keys: list[str] | str = "all", *, cfg: EvalConfig | None = None, untuned=None,
             instructions: Path | None = None, model_ref: str = "", tags: dict | None = None,
             settings: Settings | None = None, progress: bool = True) -> EvalResult:
    """Score `model` (a SkyEyeGPT) and the baselines on the chosen bench splits; log one run.

    `untuned` is the same architecture before tuning (same backbones, fresh alignment layer
    and adapter), or None to leave that baseline out.
    """
    from tqdm import tqdm

    s = settings or get_settings()
    cfg = cfg or EvalConfig()
    keys = select(keys)
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: unknown {unknown}; known: {', '.join(BASELINES)}")
    root = Path(instructions or s.instructions_dir)
    files = {k: load_eval_file(root, k) for k in keys}  # every file checked before any compute
    train = load_items(root / "stage1.json") if (root / "stage1.json").exists() else []
    tracking.setup(s)
    from ..gate import data_version_of
    md5, rev = data_version_of(root, s)
    run_tags = {"skyeye.kind": "evaluation", "skyeye.model_dir": model_ref, "skyeye.data.dvc_md5": md5 or "unversioned",
                "skyeye.data.git_rev": rev or "uncommitted", "skyeye.git_commit": git_revision(s.project_root) or "none",
                "skyeye.eval.benchmarks": ",".join(keys), "skyeye.eval.training_run": "", **(tags or {})}
    client = MlflowClient()
    exp = tracking.experiment_id(EVAL_EXPERIMENT, s)
    run_id = client.create_run(exp, run_name=f"evaluate-{Path(model_ref).name or 'model'}", tags=run_tags).info.run_id
    client.log_param(run_id, "eval_config", cfg.model_dump_json())
    started = time.perf_counter()
    cache: dict = {}
    ours = ModelPredictor(model, batch_size=cfg.batch_size, encoder_cache=cache)
    before = ModelPredictor(untuned, "untuned", cfg.batch_size, cache) if untuned is not None and "untuned" in cfg.baselines else None
    metrics: dict[str, float] = {}
    predictions: dict[str, list[dict]] = {}
    scorer = CaptionScorer() if any(TASK_OF[k] == "caption" for k in keys) else None
    try:
        eval_dir = root / "eval"
        n_rows = {k: len(_spread(f["samples"], cfg.limit)) for k, f in files.items()}
        total = sum(n + (min(n, cfg.untuned_limit or n) if before else 0) for n in n_rows.values())
        bar = tqdm(total=total, desc="evaluate", unit="sample", disable=not progress)
        for key, ev in files.items():
            task, rows = TASK_OF[key], _spread(ev["samples"], cfg.limit)
            bar.set_postfix_str(key)
            answers = ours.answer(eval_dir, rows, [r["prompt"] for r in rows], cfg.max_new_tokens[task], bar)
            now = {f"{key}/{m}": v for m, v in score(key, rows, answers, scorer).items()}
            base: dict[str, dict[str, str]] = {}  # baseline -> row id -> answer
            if before is not None:
                some = _spread(rows, cfg.untuned_limit)
                base["untuned"] = dict(zip((r["id"] for r in some), before.answer(
                    eval_dir, some, [r["prompt"] for r in some], cfg.max_new_tokens[task], bar)))
            trivial = TRIVIAL[task]
            if trivial in cfg.baselines:
                if task == "vqa":
                    trivial_answers = majority_answers(rows)
                elif task == "grounding":
                    trivial_answers = centred_boxes(rows, train, BENCHMARK_OF[key])
                else:
                    trivial_answers = nearest_captions(rows, eval_dir, train, root, BENCHMARK_OF[key])
                base[trivial] = dict(zip((r["id"] for r in rows), trivial_answers))
            for name, by_id in base.items():
                scored = [r for r in rows if r["id"] in by_id]
                now |= {f"baseline.{name}/{key}/{m}": v
                        for m, v in score(key, scored, [by_id[r["id"]] for r in scored], scorer).items()}
            metrics |= now
            predictions[key] = [{**{k: r[k] for k in ("id", "image", "video", "prompt", "answer", "question_type",
                                                        "box", "expression", "image_size") if k in r},
                                 "references": " | ".join(r.get("references", [])), "prediction": a,
                                 **{f"baseline.{n}": by_id.get(r["id"]) for n, by_id in base.items()}}
                                for r, a in zip(rows, answers)]
            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in now.items()])
        bar.close()
        primary = [metrics[f"{k}/{PRIMARY[TASK_OF[k]]}"] for k in keys]
        metrics["primary_score"] = sum(primary) / len(primary)
        seconds = time.perf_counter() - started
        client.log_metric(run_id, "primary_score", metrics["primary_score"])
        client.log_metric(run_id, "eval_seconds", seconds)
        client.log_metric(run_id, "samples", sum(len(p) for p in predictions.values()))
        _log_tables(run_id, predictions)
        with tempfile.TemporaryDirectory() as tmp:
            write_report(Path(tmp), metrics, predictions, eval_dir, cfg.examples, title=model_ref)
            client.log_artifacts(run_id, tmp, "report")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        if scorer is not None:
            scorer.close()
    client.set_terminated(run_id, "FINISHED")
    return EvalResult(run_id, metrics, predictions, seconds)


def _log_tables(run_id: str, predictions: dict[str, list[dict]]) -> None:
    """One predictions table per bench split (the MLflow UI's artifact view compares them)."""
    import pandas as pd
    client = MlflowClient()
    for key, rows in predictions.items():
        client.log_table(run_id, pd.DataFrame(rows), artifact_file=f"predictions/{key}.json")


def write_report(out: Path, metrics: dict[str, float], predictions: dict[str, list[dict]], eval_dir: Path,
                 examples: int, title: str) -> Path:
    """The charts (ours vs baselines vs the paper), grounding boxes drawn, VQA confusion
    per type, and one HTML page holding them and the score table."""
    from . import report
    from .paper import SKYEYEGPT
    ours = {k: v for k, v in metrics.items() if not k.startswith("baseline.")}
    baselines: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if k.startswith("baseline."):
            name, rest = k.removeprefix("baseline.").split("/", 1)
            baselines.setdefault(name, {})[rest] = v
    sections: list[tuple[str, Path | str]] = [
        ("Scores on SkyEye-Synth (synthetic) against the baselines; the paper's numbers are real-data figures "
         "of a 7B model, shown for scale only", report.benchmark_chart(ours, baselines, SKYEYEGPT, out / "benchmarks.png")[0]),
        ("Scores (x100; SkyEye-Synth is synthetic stand-in data)", report.metrics_table(ours, baselines, SKYEYEGPT))]
    for key, rows in predictions.items():
        task = TASK_OF[key]
        if task == "grounding":
            drawn = [{**r, "image": str(eval_dir / r["image"]), "answer": r["prediction"]} for r in rows]
            sections.append((f"{key}: ground truth (green) and predicted (red) boxes",
                             report.grounding_examples(drawn, out / f"grounding_{key}.png", examples)))
        elif task == "vqa":
            sections.append((f"{key}: answers per question type",
                             report.vqa_confusion(rows, out / f"vqa_confusion_{key}.png")))
    return report.report_html(f"SkyEyeGPT evaluation: {title}", sections, out / "report.html")


def load_for_eval(ref: str):
    """A model folder, a tuning-stage run id or a `models:/` URI -> (SkyEyeGPT, its folder,
    the training run id or ""). Any failure becomes one error naming the reference."""
    from ..model.skyeyegpt import load_model
    from ..training.tune import resolve_init, run_of_model_dir
    tracking.setup()  # the configured store, never MLflow's own default in the working directory
    try:
        if ref.startswith("models:/"):  # the registered pyfunc, unwrapped to the SkyEyeGPT inside
            from ..registry import model_name, resolve
            version = MlflowClient().get_model_version(model_name(), str(resolve(ref)))
            model = mlflow.pyfunc.load_model(ref).unwrap_python_model().model
            return model.eval(), ref, version.tags.get("skyeye.training_run", "")
        folder = resolve_init(ref)
        run = ref if folder != ref else (run_of_model_dir(folder) or "")  # a folder: the stage run that wrote it
        return load_model(folder).eval(), str(folder), run
    except Exception as err:  # noqa: BLE001 - any loader failure is reported the same way
        raise ValueError(f"--model {ref}: does not load: {err}") from None


def untuned_like(model):
    """The same architecture before tuning: its backbones, a fresh alignment layer and adapter."""
    import torch

    from ..model.skyeyegpt import build_model
    torch.manual_seed(0)  # a fixed 'before' model, so reruns give the same baseline
    return build_model(model.cfg, model.paths["vision"], model.paths["llm"], model.paths["tokenizer"]).eval()


def run_evaluation(ref: str, benchmarks: str | list[str] = "all", *, limit: int | None = None,
                   baselines: bool = True, instructions: Path | None = None, settings: Settings | None = None,
                   progress: bool = True) -> EvalResult:
    """`skyeye evaluate`: resolve the model, check the benchmarks and files, then evaluate."""
    s = settings or get_settings()
    tracking.setup(s)
    keys = select(benchmarks)  # a bad name fails before the model loads
    for key in keys:
        load_eval_file(Path(instructions or s.instructions_dir), key)
    model, folder, training_run = load_for_eval(ref)
    cfg = EvalConfig(limit=limit, baselines=BASELINES if baselines else ())
    untuned = untuned_like(model) if baselines else None
    tags = {"skyeye.eval.training_run": training_run}
    if training_run:  # the tuning job and data version of the training run, for the audit
        run = MlflowClient().get_run(training_run)
        tags["skyeye.tuning_job"] = run.data.tags.get("mlflow.parentRunId", "")
    return evaluate(model, keys, cfg=cfg, untuned=untuned, instructions=instructions, model_ref=folder, tags=tags,
                    settings=s, progress=progress)
