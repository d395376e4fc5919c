"""The paper's ablation of two-stage tuning: three recipes from the same data version, the
same backbones and the same total budget of optimizer steps, scored on the benchmarks with
95% bootstrap intervals, under one MLflow parent run (`skyeye ablation`, flows/ablation.py).

- two_stage: stage 1, then stage 2 from stage 1's model (SkyEyeGPT's recipe);
- one_stage: one stage over all the instruction data, single-task and conversations together;
- single: one model per task (caption, vqa, grounding), each on its task's sources, each
  scored on its task's bench splits only.

Budget: (stage1.max_steps + stage2.max_steps) x `budget` optimizer steps per recipe;
`time_budget_s`, a safety net, scales with it.
"""
from __future__ import annotations

# imports inside functions: the runs (torch, Ray) and matplotlib load only when the ablation runs or draws
import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from ..config import DEFAULT_MODEL_FILE, STAGE_FILE, WORKERS_PER_STAGE, Settings, get_settings, load_yaml_config
from ..data.items import load_items
from ..datagate.gate import data_version_of
from ..evaluation.baselines import TRIVIAL
from ..evaluation.intervals import LEVEL, RESAMPLES, ItemStats, Level, Resamples, bootstrap, compare
from ..evaluation.paper import ONE_STAGE, SKYEYEGPT
from ..formats.benchmarks import EVAL_KEYS, PRIMARY, TASK, TASK_OF, TASKS, metric, primary_metric
from ..model.config import load_model_config
from ..model.references import load
from ..tracking import runs
from ..tracking.names import (
    KIND_TUNING_JOB,
    TAG_DVC_MD5,
    TAG_EVAL_TRAINING_RUN,
    TAG_KIND,
    TAG_PARENT,
    TAG_TUNING_JOB,
    TUNING_EXPERIMENT,
    UNVERSIONED,
)
from .stage_config import StageConfig, ValidationConfig, load_stage_config

RECIPES = ("two_stage", "one_stage", "single")
Recipe = Literal["two_stage", "one_stage", "single"]
PAPER_NOTE = "the paper's ablation (SkyEyeGPT, Zhan et al. 2024; real data, 7B)"


class AblationConfig(BaseModel):
    """configs/ablation.yaml. Paths are relative to the project root."""
    model_config = ConfigDict(extra="forbid")
    model: str = DEFAULT_MODEL_FILE
    stage1: str = STAGE_FILE.format(stage=1)
    stage2: str = STAGE_FILE.format(stage=2)
    budget: float = Field(1.0, gt=0, description="Scale of the budget (and of the time safety net).")
    recipes: list[Recipe] = Field(default_factory=lambda: list(RECIPES), min_length=1)
    limit: int | None = Field(None, ge=1, description="Evaluation samples per bench split (None: all).")
    resamples: Resamples = RESAMPLES
    level: Level = LEVEL
    num_workers: int = Field(WORKERS_PER_STAGE, ge=1, description="Ray Train workers per stage.")
    local: bool = Field(False, description="Train in this process instead of on Ray Train.")
    seed: int = Field(0, description="Every stage's seed (the recipes differ in nothing else) and the bootstrap's.")

    @field_validator("recipes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return [r for r in RECIPES if r in v]  # the paper's order, once each


def load_ablation_config(path: str | Path | None = None, **overrides) -> AblationConfig:
    """The config file (defaults when it does not exist) with the non-None `overrides`;
    a bad value is a ValueError naming the file and the field."""
    raw = {}
    if path is not None and Path(path).exists():
        raw = load_yaml_config(Path(path), AblationConfig).model_dump()
    try:
        return AblationConfig.model_validate(raw | {k: v for k, v in overrides.items() if v is not None})
    except Exception as err:  # pydantic names the field
        raise ValueError(f"ablation config{f' {path}' if path else ''}: {err}") from None


@dataclass(frozen=True)
class Job:
    """One training stage of a recipe; `init` names the job whose model it starts from,
    `keys` the bench splits its model is scored on (only a recipe's final models have them)."""
    name: str
    stage: int
    config: StageConfig
    init: str | None = None
    keys: tuple[str, ...] = ()


def source_counts(instructions: Path) -> dict[str, Counter]:
    """Items per source in stage1.json and stage2.json."""
    out = {}
    for name in ("stage1", "stage2"):
        path = Path(instructions) / f"{name}.json"
        if not path.exists():
            raise ValueError(f"{path}: instruction file not found (run `skyeye data build`)")
        out[name] = Counter(it.source for it in load_items(path))
    return out


def split_steps(total: int, parts: int) -> list[int]:
    """`total` steps in `parts` near-equal shares that sum to it exactly."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _scaled(cfg: StageConfig, steps: int, time_s: float | None, seed: int, **update) -> StageConfig:
    # warm-up stays absolute (it is about the start of optimisation, not the length), below the job's steps
    return StageConfig.model_validate(cfg.model_copy(update={
        "max_steps": steps, "time_budget_s": time_s, "warmup_steps": min(cfg.warmup_steps, steps - 1),
        "seed": seed, **update}).model_dump())


def plan(cfg: AblationConfig, stage1: StageConfig, stage2: StageConfig, counts: dict[str, Counter]
         ) -> dict[str, list[Job]]:
    """Each recipe's jobs, all recipes on the same number of optimizer steps."""
    total = round((stage1.max_steps + stage2.max_steps) * cfg.budget)
    if total < 1:
        raise ValueError(f"budget {cfg.budget}: gives {total} steps; raise it")
    times = [None if t is None else t * cfg.budget for t in (stage1.time_budget_s, stage2.time_budget_s)]
    time_total = None if None in times else sum(times)
    share = lambda steps: None if time_total is None else time_total * steps / total  # noqa: E731
    out: dict[str, list[Job]] = {}
    if "two_stage" in cfg.recipes:
        s1 = round(stage1.max_steps * cfg.budget)
        if s1 < 1 or total - s1 < 1:
            raise ValueError(f"budget {cfg.budget}: gives stage 1 {s1} and stage 2 {total - s1} steps; "
                             "each needs at least 1")
        out["two_stage"] = [Job("stage1", 1, _scaled(stage1, s1, times[0], cfg.seed)),
                            Job("stage2", 2, _scaled(stage2, total - s1, times[1], cfg.seed),
                                init="stage1", keys=EVAL_KEYS)]
    if "one_stage" in cfg.recipes:
        # All the instruction data in one stage without writing a merged file into the
        # DVC-tracked instruction folder: stage 1's config with stage2.json as its `replay`,
        # drawn at stage 2's share of all items (each file sampled as its own stage says);
        # max_length fits the conversations; validation scores include them as stage 2's do.
        n1, n2 = sum(counts["stage1"].values()), sum(counts["stage2"].values())
        mix = {"replay": stage2.data, "replay_share": n2 / (n1 + n2), "replay_sampling": stage2.sampling} \
            if n2 else {"replay": None, "replay_share": 0.0, "replay_sampling": {}}
        validation = stage1.validation.model_copy(update={"conversation": stage2.validation.conversation})
        out["one_stage"] = [Job("stage1", 1, _scaled(stage1, total, time_total, cfg.seed, **mix, validation=validation,
                                                     max_length=max(stage1.max_length, stage2.max_length)),
                                keys=EVAL_KEYS)]
    if "single" in cfg.recipes:
        if total < len(TASKS):
            raise ValueError(f"budget {cfg.budget}: {total} steps cannot give each of the {len(TASKS)} "
                             "single-task models one")
        out["single"] = [Job(task, 1, _scaled(stage1, steps, share(steps), cfg.seed,
                                              sampling=_task_sampling(task, stage1, counts["stage1"]),
                                              validation=_task_validation(task, stage1.validation)),
                             keys=tuple(k for k in EVAL_KEYS if TASK_OF[k] == task))
                         for task, steps in zip(TASKS, split_steps(total, len(TASKS)), strict=True)]
    return out


def _task_sampling(task: str, stage1: StageConfig, counts: Counter) -> dict[str, float]:
    """Stage 1's ratios (by size when it has none) over the task's sources; every other source 0."""
    ratios = {s: (stage1.sampling.get(s, 0.0) if stage1.sampling else float(n)) if TASK.get(s) == task else 0.0
              for s, n in counts.items()}
    if not any(ratios.values()):
        raise ValueError(f"single: stage1.sampling gives no weight to a {task} source "
                         f"({', '.join(s for s in TASK if TASK[s] == task)})")
    return ratios


def _task_validation(task: str, validation: ValidationConfig) -> ValidationConfig:
    """Learning curves of the model's own task only (the others are not trained)."""
    return validation.model_copy(update={t: getattr(validation, t) if t == task else None for t in TASKS}
                                 | {"conversation": None})


def _path(rel: str, s: Settings) -> Path:
    return Path(rel) if Path(rel).is_absolute() else s.project_root / rel


def plan_for(cfg: AblationConfig, instructions: Path | None = None, settings: Settings | None = None
             ) -> dict[str, list[Job]]:
    s = settings or get_settings()
    return plan(cfg, load_stage_config(_path(cfg.stage1, s)), load_stage_config(_path(cfg.stage2, s)),
                source_counts(Path(instructions or s.instructions_dir)))


def _say(text: str) -> None:
    tqdm.write(text)  # between the progress bars, not through them


def run_recipe(recipe: str, jobs: list[Job], cfg: AblationConfig, backbones: dict[str, str], parent_id: str, *,
               instructions: Path | None = None, md5: str | None = None, settings: Settings | None = None) -> dict:
    """Train a recipe's jobs and score its final models, as a child run of the ablation;
    returns what the comparison needs (JSON: a flow passes it between tasks)."""
    from ..evaluation.runner import EvalConfig, evaluate
    from .jobs import flatten, train_stage
    s = settings or get_settings()
    instructions = Path(instructions or s.instructions_dir)
    model_cfg = load_model_config(_path(cfg.model, s))
    out: dict = {"recipe": recipe, "stage_runs": {}, "eval_runs": {}, "steps": 0, "metrics": {}, "stats": {}}
    models: dict[str, str] = {}
    with runs.tracked_run(TUNING_EXPERIMENT, recipe, {TAG_KIND: KIND_TUNING_JOB, TAG_DVC_MD5: md5 or UNVERSIONED},
                          parent=parent_id, settings=s) as run_id:
        client = runs.client(s)
        for key, value in flatten({j.name: {"max_steps": j.config.max_steps, "time_budget_s": j.config.time_budget_s,
                                            "sampling": json.dumps(j.config.sampling), "replay": j.config.replay,
                                            "replay_share": round(j.config.replay_share, 4)} for j in jobs}).items():
            client.log_param(run_id, key, value)
        for i, job in enumerate(jobs, 1):
            _say(f"ablation {recipe} [{i}/{len(jobs)}] {job.name}: stage {job.stage}, {job.config.max_steps} steps")
            result = train_stage(job.stage, model_cfg, job.config, backbones, instructions=instructions,
                                 init=models.get(job.init) if job.init else None, num_workers=cfg.num_workers,
                                 local=cfg.local, parent_id=run_id, settings=s)
            models[job.name], out["stage_runs"][job.name] = result.model_dir, result.run_id
            out["steps"] += int(result.metrics.get("step", 0))
            if not job.keys:
                continue
            eval_cfg = EvalConfig(limit=cfg.limit, baselines=tuple(TRIVIAL.values()),  # untuned: not compared here
                                  resamples=cfg.resamples, level=cfg.level, seed=cfg.seed)
            scored = evaluate(load(result.model_dir).model, list(job.keys), cfg=eval_cfg, untuned=None,
                              instructions=instructions, model_ref=result.model_dir, settings=s,
                              tags={TAG_EVAL_TRAINING_RUN: result.run_id, TAG_TUNING_JOB: run_id, TAG_PARENT: run_id})
            out["eval_runs"][job.name] = scored.run_id
            out["metrics"] |= {k: v for k, v in scored.metrics.items() if _split_of(k) in job.keys}
            out["stats"] |= {k: st.to_json() for k, st in scored.stats.items() if k in job.keys}
        out["budget_steps"] = sum(j.config.max_steps for j in jobs)
        primaries = {primary_metric(k) for k in EVAL_KEYS}
        runs.log_metrics(run_id, {"steps": out["steps"]} | {k: v for k, v in out["metrics"].items() if k in primaries},
                         settings=s)
    out["run_id"] = run_id
    return out


def _split_of(name: str) -> str:
    """The bench split of `<split>/<metric>` or of a baseline's `baseline.<name>/<split>/<metric>`."""
    parts = name.split("/")
    return parts[1] if name.startswith("baseline.") and len(parts) > 2 else parts[0]


def compare_recipes(results: dict[str, dict], cfg: AblationConfig) -> list[dict]:
    """One row per bench split: each recipe's primary metric with its bootstrap interval, the
    paired differences two_stage - one_stage and two_stage - single, the paper's figures."""
    stats = {r: {k: ItemStats.from_json(v) for k, v in res["stats"].items()} for r, res in results.items()}
    opts = {"resamples": cfg.resamples, "seed": cfg.seed, "level": cfg.level}
    rows = []
    for key in [k for k in EVAL_KEYS if any(k in by_key for by_key in stats.values())]:
        task = TASK_OF[key]
        name = PRIMARY[task]
        row: dict = {"split": key, "task": task, "metric": name}
        for recipe in [r for r in RECIPES if key in stats.get(r, {})]:
            interval = bootstrap(stats[recipe][key], **opts)[name]
            row |= {recipe: results[recipe]["metrics"][metric(key, name)], f"{recipe}.low": interval.low,
                    f"{recipe}.high": interval.high}
        for other in ("one_stage", "single"):
            if key in stats.get("two_stage", {}) and key in stats.get(other, {}):
                delta = compare(stats["two_stage"][key], stats[other][key], **opts)[name]  # paired: same items
                row |= {f"two_stage-{other}": delta.value, f"two_stage-{other}.low": delta.low,
                        f"two_stage-{other}.high": delta.high, f"two_stage-{other}.verdict": delta.verdict}
        baseline = next((res["metrics"].get(metric(key, name, TRIVIAL[task])) for res in results.values()
                         if metric(key, name, TRIVIAL[task]) in res["metrics"]), None)
        row |= {"trivial baseline": baseline, "paper.two_stage": SKYEYEGPT.get(key, {}).get(name),
                "paper.one_stage": ONE_STAGE.get(key, {}).get(name)}
        rows.append(row)
    return rows


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(rows: list[dict], results: dict[str, dict], cfg: AblationConfig) -> str:
    """The comparison as a markdown table, with the steps each recipe trained."""
    recipes = [r for r in RECIPES if r in results]
    deltas = [d for d in ("one_stage", "single") if any(f"two_stage-{d}" in row for row in rows)]
    head = ["split", "metric", *recipes, *(f"two_stage - {d}" for d in deltas), "trivial",
            "paper two_stage / one_stage"]
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for row in rows:
        cells = [row["split"], row["metric"]]
        cells += [f"{_num(row[r])} [{_num(row[r + '.low'])}, {_num(row[r + '.high'])}]" if r in row else "-"
                  for r in recipes]
        cells += [f"{row[f'two_stage-{d}']:+.1f} [{_num(row[f'two_stage-{d}.low'])}, "
                  f"{_num(row[f'two_stage-{d}.high'])}] {row[f'two_stage-{d}.verdict']}"
                  if f"two_stage-{d}" in row else "-" for d in deltas]
        cells += [_num(row["trivial baseline"]), f"{_num(row['paper.two_stage'])} / {_num(row['paper.one_stage'])}"]
        lines.append(f"| {' | '.join(cells)} |")
    steps = ", ".join(f"{r} {results[r]['steps']} of {results[r]['budget_steps']}" for r in recipes)
    short = [r for r in recipes if results[r]["steps"] < results[r]["budget_steps"]]
    lines += ["", f"Optimizer steps trained: {steps}" + (f" ({', '.join(short)}: stopped by the time safety net)"
                                                        if short else "") + ".",
              f"Intervals: {cfg.level:.0%} bootstrap ({cfg.resamples} resamples); a difference is significant when "
              "its paired interval excludes 0. Ours: SkyEye-Synth (synthetic), tiny model; the paper's columns are "
              f"{PAPER_NOTE}, for orientation only."]
    return "\n".join(lines)


def chart(rows: list[dict], out: Path) -> Path:
    """Per bench split, the recipes' primary metric with its interval as error bars, and the
    paper's two_stage / one_stage figures (hatched, real data, 7B) beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.report import OURS_LABEL, PAPER_LABEL
    cols = min(5, len(rows))
    lines = -(-len(rows) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(max(3.2 * cols, 9), 3.4 * lines), squeeze=False)
    colours = dict(zip(RECIPES, plt.get_cmap("tab10").colors, strict=False))
    for ax, row in zip(axes.flat, rows, strict=False):
        for x, recipe in enumerate(RECIPES):
            if recipe in row:
                err = [[row[recipe] - row[f"{recipe}.low"]], [row[f"{recipe}.high"] - row[recipe]]]
                ax.bar(x, row[recipe], color=colours[recipe], yerr=err, capsize=3, label=f"{recipe}: {OURS_LABEL}")
        for x, recipe in ((3.5, "two_stage"), (4.5, "one_stage")):
            if row[f"paper.{recipe}"] is not None:
                ax.bar(x, row[f"paper.{recipe}"], color=colours[recipe], alpha=0.45, hatch="//",
                       label=f"{recipe}: {PAPER_LABEL}")
        ax.set_xticks([1, 4], ["ours", "paper"], fontsize=7)
        ax.set_title(f"{row['split']}\n{row['metric']} (x100)", fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    handles = {lbl: h for ax in axes.flat for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("Ablation: two_stage vs one_stage vs single (error bars: bootstrap intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 / lines + 0.04, 1, 0.95))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def log_comparison(parent_id: str, results: dict[str, dict], cfg: AblationConfig,
                   settings: Settings | None = None) -> dict:
    """The comparison into the ablation's parent run: table (MLflow table, JSON, markdown), chart,
    and `<recipe>/<split>/<metric>` for the primary metrics. Returns {rows, markdown}."""
    s = settings or get_settings()
    rows = compare_recipes(results, cfg)
    markdown = render(rows, results, cfg)
    client = runs.client(s)
    client.log_table(parent_id, pd.DataFrame(rows), artifact_file="ablation/comparison.json")
    metrics = {f"{r}/{metric(row['split'], row['metric'])}": row[r] for row in rows for r in RECIPES if r in row}
    runs.log_metrics(parent_id, metrics | {f"{r}/steps": res["steps"] for r, res in results.items()}, settings=s)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "comparison.md").write_text(markdown + "\n")
        chart(rows, Path(tmp) / "comparison.png")
        client.log_artifacts(parent_id, tmp, "ablation")
    return {"rows": rows, "markdown": markdown}


def run_ablation(cfg: AblationConfig, *, instructions: Path | None = None, settings: Settings | None = None) -> dict:
    """The whole ablation in this process (`skyeye ablation`): backbones, each recipe, the
    comparison, under one parent run. Returns {parent_run, results, rows, markdown}."""
    from .jobs import prepare_backbones, tuning_job
    s = settings or get_settings()
    instructions = Path(instructions or s.instructions_dir)
    jobs = plan_for(cfg, instructions, s)  # a bad config or budget fails before any compute
    md5, _ = data_version_of(instructions, s)
    with tuning_job("ablation", s, {TAG_DVC_MD5: md5 or UNVERSIONED}) as parent:
        log_config(parent, cfg, s)
        backbones = prepare_backbones(_path(cfg.model, s), instructions=instructions, parent_id=parent, settings=s)
        results = {r: run_recipe(r, jobs[r], cfg, backbones, parent, instructions=instructions, md5=md5, settings=s)
                   for r in cfg.recipes}
        return {"parent_run": parent, "results": results} | log_comparison(parent, results, cfg, s)


def log_config(parent_id: str, cfg: AblationConfig, settings: Settings | None = None) -> None:
    client = runs.client(settings)
    for key, value in cfg.model_dump(mode="json").items():
        client.log_param(parent_id, key, json.dumps(value) if isinstance(value, list) else str(value))
