"""`skyeye evaluate`: the 8 benchmarks with the paper's prompts and metric conventions,
SkyEyeGPT and its baselines scored the same way, everything in one MLflow run.

Metric names follow `skyeye.formats.benchmarks` (`<bench_split>/<metric>` on the paper's
x100 scale; a baseline's `baseline.<name>/<bench_split>/<metric>`). Every score comes with
its 95% bootstrap interval over the test items (`..._ci_low`, `..._ci_high`) and the
model's paired difference to each baseline on the same items
(`<bench_split>/<metric>_delta_vs_<baseline>` with its bounds); the per-item statistics
behind them are kept in the run (`item_stats/`), so later comparisons (against the
version in production) need no re-run. The run ends FINISHED only when every benchmark
was scored, so the registry never sees a half evaluation.
"""
from __future__ import annotations

# imports inside functions: report brings matplotlib: loaded only when a report is written
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from ..config import Settings, get_settings, git_revision
from ..data.items import load_items
from ..data.records import DataFormatError, read_json
from ..datagate.gate import data_version_of
from ..formats.benchmarks import (
    BENCHMARK_OF,
    EVAL_KEYS,
    PRIMARY,
    PRIMARY_SCORE,
    SPLIT_OF,
    TASK_OF,
    ci_bounds,
    delta_metric,
    folder_of,
    metric,
    primary_metric,
    select,
    spread,
)
from ..formats.licences import card_licences
from ..model.references import load
from ..model.skyeyegpt import untuned_like
from ..tracking import runs
from ..tracking.names import (
    EVALUATION_EXPERIMENT,
    EVALUATION_ON_VALIDATION_EXPERIMENT,
    KIND_EVALUATION,
    KIND_EVALUATION_ON_VALIDATION,
    NO_TEST_SPLITS,
    TAG_DVC_MD5,
    TAG_EVAL_BENCHMARKS,
    TAG_EVAL_TRAINING_RUN,
    TAG_GIT_COMMIT,
    TAG_GIT_REV,
    TAG_KIND,
    TAG_MODEL_DIR,
    TAG_PARENT,
    TAG_TEST_SPLITS_READ,
    TAG_TUNING_JOB,
    UNCOMMITTED,
    UNVERSIONED,
    licences_tag,
)
from .baselines import BASELINES, TRIVIAL, approved_tasks, trivial_answers
from .comparison import MODEL, save_item_stats
from .intervals import LEVEL, RESAMPLES, ItemStats, Level, Resamples, bootstrap, compare, verdict
from .metrics import CaptionScorer, caption_items, grounding_items, vqa_items
from .paper import SKYEYEGPT
from .predictors import ModelPredictor
from .sharding import ShardedPredictor, check_num_workers, resolve_ref, worker_pool

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
    # bootstrap intervals over each split's test items (percentile, seeded: reruns agree)
    resamples: Resamples = RESAMPLES
    level: Level = LEVEL
    seed: int = 0


@dataclass
class EvalResult:
    run_id: str
    metrics: dict[str, float]
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0
    stats: dict[str, ItemStats] = field(default_factory=dict)  # bench split -> the model's per-item statistics

    def render(self) -> str:
        m = self.metrics
        lines = [f"evaluation run {self.run_id} ({self.seconds:.0f} s); [95% bootstrap interval]",
                 f"{'bench split':22s} {'metric':10s} {'ours':>22s}  against baselines (paired difference)"]
        for key in self.predictions:
            name = PRIMARY[TASK_OF[key]]
            ours = metric(key, name)
            low, high = (m.get(b) for b in ci_bounds(ours))
            shown = f"{m[ours]:.1f}" + (f" [{low:.1f}, {high:.1f}]" if low is not None else "")
            against = []
            for b in BASELINES:
                d = delta_metric(key, name, b)
                if d in m:
                    dl, dh = (m[x] for x in ci_bounds(d))
                    said = verdict(dl, dh).replace("significant", "sig.")  # the short form fits the line
                    against.append(f"{b} {m[metric(key, name, b)]:.1f}: {m[d]:+.1f} [{dl:+.1f}, {dh:+.1f}] {said}")
            lines.append(f"{key:22s} {name:10s} {shown:>22s}  " + "; ".join(against))
        lines.append(f"{PRIMARY_SCORE} {m[PRIMARY_SCORE]:.2f}")
        lines.append(f"approved tasks (better than the trivial baseline on every split): "
                     f"{', '.join(approved_tasks(m)) or 'none'}")
        return "\n".join(lines)


def load_eval_file(instructions: Path, key: str) -> dict:
    """One evaluation (or validation) file, checked against the benchmark it claims to be."""
    path = Path(instructions) / folder_of(key) / f"{key}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: evaluation file not found (run `skyeye data build`)")
    ev = read_json(path)
    bench, split = BENCHMARK_OF[key], SPLIT_OF[key]
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


def score_items(key: str, rows: list[dict], answers: list[str], scorer: CaptionScorer | None = None) -> ItemStats:
    """The paper's metrics for one bench split with each item's statistics (for intervals and
    paired differences); a shared CaptionScorer keeps one METEOR process."""
    task, ids = TASK_OF[key], [r["id"] for r in rows]
    if task == "caption":
        refs = [r["references"] for r in rows]
        return scorer.score_items(answers, refs, ids) if scorer else caption_items(answers, refs, ids=ids)
    if task == "vqa":
        return vqa_items(answers, [r["answer"] for r in rows], [r["question_type"] for r in rows], ids=ids)
    return grounding_items(answers, [tuple(r["box"]) for r in rows], [tuple(r["image_size"]) for r in rows], ids=ids)


def score(key: str, rows: list[dict], answers: list[str], scorer: CaptionScorer | None = None) -> dict[str, float]:
    """The paper's metrics for one bench split."""
    return score_items(key, rows, answers, scorer).scores


def with_intervals(key: str, stats: dict[str, ItemStats], cfg: EvalConfig) -> dict[str, float]:
    """Every score of the model ("model") and of each baseline ("baseline.<name>") with its
    bootstrap interval, and the model's paired difference to each baseline on the items that
    baseline answered (the untuned model answers a subset)."""
    out: dict[str, float] = {}
    ours = stats[MODEL]
    for name, s in stats.items():
        baseline = None if name == MODEL else name.removeprefix("baseline.")
        for m, iv in bootstrap(s, cfg.resamples, cfg.seed, cfg.level).items():
            full = metric(key, m, baseline)
            out |= dict(zip((full, *ci_bounds(full)), (s.scores[m], iv.low, iv.high), strict=True))
        if baseline:
            for m, d in compare(ours, s, cfg.resamples, cfg.seed, cfg.level).items():
                full = delta_metric(key, m, baseline)
                out |= dict(zip((full, *ci_bounds(full)), (d.value, d.low, d.high), strict=True))
    return out


@dataclass
class _Split:
    """What one bench split's scoring produced."""
    metrics: dict[str, float]
    predictions: list[dict]
    stats: dict[str, ItemStats]  # "model" and "baseline.<name>" -> per-item statistics
    interval_seconds: float


def _score_split(key: str, rows: list[dict], root: Path, train: list, cfg: EvalConfig, ours: ModelPredictor,
                 untuned: ModelPredictor | None, scorer: CaptionScorer | None, bar) -> _Split:
    """The model, the untuned model (on a spread subset) and the task's trivial baseline on one split."""
    task, eval_dir = TASK_OF[key], root / folder_of(key)
    answers = ours.answer(eval_dir, rows, [r["prompt"] for r in rows], cfg.max_new_tokens[task], bar)
    stats = {MODEL: score_items(key, rows, answers, scorer)}
    base: dict[str, dict[str, str]] = {}  # baseline -> row id -> answer
    if untuned is not None:
        some = spread(rows, cfg.untuned_limit)
        base["untuned"] = dict(zip((r["id"] for r in some), untuned.answer(
            eval_dir, some, [r["prompt"] for r in some], cfg.max_new_tokens[task], bar), strict=True))
    if TRIVIAL[task] in cfg.baselines:
        name, trivial = trivial_answers(task, rows, eval_dir, train, root, BENCHMARK_OF[key])
        base[name] = dict(zip((r["id"] for r in rows), trivial, strict=True))
    for name, by_id in base.items():
        scored = [r for r in rows if r["id"] in by_id]
        stats[f"baseline.{name}"] = score_items(key, scored, [by_id[r["id"]] for r in scored], scorer)
    started = time.perf_counter()
    now = with_intervals(key, stats, cfg)
    interval_seconds = time.perf_counter() - started
    predictions = [{**{k: r[k] for k in ("id", "image", "video", "prompt", "answer", "question_type", "box",
                                         "expression", "image_size") if k in r},
                    "references": " | ".join(r.get("references", [])), "prediction": a,
                    **{f"baseline.{n}": by_id.get(r["id"]) for n, by_id in base.items()}}
                   for r, a in zip(rows, answers, strict=True)]
    return _Split(now, predictions, stats, interval_seconds)


def _run_tags(root: Path, keys: list[str], model_ref: str, tags: dict | None, s: Settings) -> dict[str, str]:
    md5, rev = data_version_of(root, s)
    tests = [k for k in keys if k in EVAL_KEYS]
    return {TAG_KIND: KIND_EVALUATION if tests else KIND_EVALUATION_ON_VALIDATION, TAG_MODEL_DIR: model_ref,
            TAG_DVC_MD5: md5 or UNVERSIONED, TAG_GIT_REV: rev or UNCOMMITTED,
            TAG_GIT_COMMIT: git_revision(s.project_root) or "none", TAG_EVAL_BENCHMARKS: ",".join(keys),
            TAG_TEST_SPLITS_READ: ",".join(tests) or NO_TEST_SPLITS, TAG_EVAL_TRAINING_RUN: "",
            **licences_tag(card_licences(root)), **(tags or {})}


def _finish(run_id: str, keys: list[str], metrics: dict[str, float], splits: dict[str, _Split],
            root: Path, cfg: EvalConfig, model_ref: str, seconds: float, s: Settings) -> None:
    """The primary score, timings, the predictions tables, the per-item statistics and the report, into the run."""
    predictions = {k: split.predictions for k, split in splits.items()}
    runs.log_metrics(run_id, {PRIMARY_SCORE: metrics[PRIMARY_SCORE], "eval_seconds": seconds,
                              "interval_seconds": sum(split.interval_seconds for split in splits.values()),
                              "samples": sum(len(p) for p in predictions.values())}, settings=s)
    _log_tables(run_id, predictions, s)
    save_item_stats(run_id, {k: split.stats for k, split in splits.items()}, s)
    with tempfile.TemporaryDirectory() as tmp:
        write_report(Path(tmp), metrics, predictions, root / folder_of(keys[0]), cfg.examples, title=model_ref)
        runs.client(s).log_artifacts(run_id, tmp, "report")


def evaluate(model, keys: list[str] | str = "all", *, cfg: EvalConfig | None = None, untuned=None,
             instructions: Path | None = None, model_ref: str = "", tags: dict | None = None,
             settings: Settings | None = None, progress: bool = True, on: str = "test") -> EvalResult:
    """Score `model` (a SkyEyeGPT) and the baselines on the chosen bench splits; log one run.

    `untuned` is the same architecture before tuning (same backbones, fresh alignment layer
    and adapter), or None to leave that baseline out.
    """
    cfg = cfg or EvalConfig()
    cache: dict = {}  # the model and its untuned baseline share the frozen encoder: encode once
    ours = ModelPredictor(model, batch_size=cfg.batch_size, encoder_cache=cache)
    before = ModelPredictor(untuned, "untuned", cfg.batch_size, cache) \
        if untuned is not None and "untuned" in cfg.baselines else None
    return evaluate_with(ours, before, keys, cfg=cfg, instructions=instructions, model_ref=model_ref, tags=tags,
                         settings=settings, progress=progress, on=on)


def evaluate_with(ours: ModelPredictor | ShardedPredictor, before: ModelPredictor | ShardedPredictor | None,
                  keys: list[str] | str = "all", *, cfg: EvalConfig | None = None, instructions: Path | None = None,
                  model_ref: str = "", tags: dict | None = None, settings: Settings | None = None,
                  progress: bool = True, on: str = "test") -> EvalResult:
    """`evaluate` with the answers coming from `ours` (and `before`, the untuned model): a model
    in this process, or Ray workers (`sharding`); scoring and the run are the same either way.
    `on`: the split set, `test` (the scored splits; a registry candidate's run) or `validation`
    (recipe checks, logged to their own experiment)."""
    s = settings or get_settings()
    cfg = cfg or EvalConfig()
    keys = select(keys, on)
    unknown = [b for b in cfg.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines: unknown {unknown}; known: {', '.join(BASELINES)}")
    root = Path(instructions or s.instructions_dir)
    files = {k: load_eval_file(root, k) for k in keys}  # every file checked before any compute
    train = load_items(root / "stage1.json") if (root / "stage1.json").exists() else []
    metrics: dict[str, float] = {}
    splits: dict[str, _Split] = {}
    name = f"evaluate-{Path(model_ref).name or 'model'}"
    experiment = EVALUATION_EXPERIMENT if on == "test" else EVALUATION_ON_VALIDATION_EXPERIMENT
    with runs.tracked_run(experiment, name, _run_tags(root, keys, model_ref, tags, s), settings=s) as run_id:
        runs.client(s).log_param(run_id, "eval_config", cfg.model_dump_json())
        started = time.perf_counter()
        scorer = CaptionScorer() if any(TASK_OF[k] == "caption" for k in keys) else None
        try:
            rows_of = {k: spread(f["samples"], cfg.limit) for k, f in files.items()}
            workers = {"num_workers": "1"}
            if isinstance(ours, ShardedPredictor):  # every split queued now: scoring overlaps the workers
                shards = ours.prefetch(root / folder_of(keys[0]), [(rows, cfg.max_new_tokens[TASK_OF[k]])
                                                       for k, rows in rows_of.items()], before, cfg.untuned_limit)
                workers = {"num_workers": str(ours.pool.size), "eval_shards": str(shards)}
            for param, value in workers.items():
                runs.client(s).log_param(run_id, param, value)
            total = sum(len(r) + (min(len(r), cfg.untuned_limit or len(r)) if before else 0) for r in rows_of.values())
            with tqdm(total=total, desc="evaluate", unit="sample", disable=not progress) as bar:
                for key, rows in rows_of.items():
                    bar.set_postfix_str(key)
                    splits[key] = split = _score_split(key, rows, root, train, cfg, ours, before, scorer, bar)
                    metrics |= split.metrics
                    runs.log_metrics(run_id, split.metrics, settings=s)
        finally:
            if scorer is not None:
                scorer.close()
        metrics[PRIMARY_SCORE] = sum(metrics[primary_metric(k)] for k in keys) / len(keys)
        seconds = time.perf_counter() - started
        _finish(run_id, keys, metrics, splits, root, cfg, model_ref, seconds, s)
    return EvalResult(run_id, metrics, {k: split.predictions for k, split in splits.items()}, seconds,
                      {k: split.stats[MODEL] for k, split in splits.items()})


def _log_tables(run_id: str, predictions: dict[str, list[dict]], s: Settings) -> None:
    """One predictions table per bench split (the MLflow UI's artifact view compares them)."""
    client = runs.client(s)
    for key, rows in predictions.items():
        client.log_table(run_id, pd.DataFrame(rows), artifact_file=f"predictions/{key}.json")


def write_report(out: Path, metrics: dict[str, float], predictions: dict[str, list[dict]], eval_dir: Path,
                 examples: int, title: str) -> Path:
    """The charts (ours vs baselines vs the paper), grounding boxes drawn, VQA confusion
    per type, and one HTML page holding them and the score table."""
    from . import report
    ours = {k: v for k, v in metrics.items() if not k.startswith("baseline.")}
    baselines: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if k.startswith("baseline."):
            name, rest = k.removeprefix("baseline.").split("/", 1)
            baselines.setdefault(name, {})[rest] = v
    sections: list[tuple[str, Path | str]] = [
        ("Scores on SkyEye-Synth (synthetic) against the baselines; the paper's numbers are real-data figures "
         "of a 7B model, shown for scale only",
         report.benchmark_chart(ours, baselines, SKYEYEGPT, out / "benchmarks.png")[0]),
        ("Scores (x100; SkyEye-Synth is synthetic stand-in data) with 95% bootstrap intervals over the test items",
         report.metrics_table(ours, baselines, SKYEYEGPT)),
        ("The model against each baseline on the same test items (paired bootstrap of the difference)",
         report.approval(ours) + report.comparison_table(ours))]
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


def run_evaluation(ref: str, benchmarks: str | list[str] = "all", *, limit: int | None = None,
                   baselines: bool = True, instructions: Path | None = None, settings: Settings | None = None,
                   progress: bool = True, num_workers: int = 1, batch_size: int | None = None,
                   gpus_per_worker: float = 0, on: str = "test") -> EvalResult:
    """`skyeye evaluate`: resolve the model, check the benchmarks and files, then evaluate:
    in this process (`num_workers` 1), or on `num_workers` Ray workers that each load the
    model from the same reference (`sharding`; `gpus_per_worker` > 0 puts each on a GPU)."""
    s = settings or get_settings()
    check_num_workers(num_workers)
    keys = select(benchmarks, on)  # a bad name fails before the model loads
    for key in keys:
        load_eval_file(Path(instructions or s.instructions_dir), key)
    cfg = EvalConfig(limit=limit, baselines=BASELINES if baselines else (),
                     **({"batch_size": batch_size} if batch_size else {}))
    if num_workers > 1:
        model = resolve_ref(ref)
        with worker_pool(model, num_workers, untuned=baselines, batch_size=cfg.batch_size, settings=s,
                         gpus_per_worker=gpus_per_worker) as pool:
            return evaluate_with(ShardedPredictor(pool), ShardedPredictor(pool, "untuned") if baselines else None,
                                 keys, cfg=cfg, instructions=instructions, model_ref=model.source,
                                 tags=_lineage_tags(model.training_run, s), settings=s, progress=progress, on=on)
    loaded = load(ref)
    untuned = untuned_like(loaded.model) if baselines else None
    return evaluate(loaded.model, keys, cfg=cfg, untuned=untuned, instructions=instructions, model_ref=loaded.source,
                    tags=_lineage_tags(loaded.training_run, s), settings=s, progress=progress, on=on)


def _lineage_tags(training_run: str, s: Settings) -> dict[str, str]:
    """The training run that wrote the scored model and its tuning job, for the audit."""
    tags = {TAG_EVAL_TRAINING_RUN: training_run}
    if training_run:
        tags[TAG_TUNING_JOB] = runs.client(s).get_run(training_run).data.tags.get(TAG_PARENT, "")
    return tags
