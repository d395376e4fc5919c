"""Helpers several test modules share: evaluation runs written the way the evaluation
writes them, and a dim-64 model taught a fixed batch (so it answers what a test expects)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from skyeye.evaluation.baselines import TRIVIAL
from skyeye.formats.benchmarks import EVAL_KEYS, PRIMARY, TASK_OF, ci_bounds, delta_metric
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig
from skyeye.model.skyeyegpt import build_model
from skyeye.model.template import collate, encode_conversation
from skyeye.tracking import runs

EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoRA on every linear layer and lm_head in full, as the tiny config: a dim-64 model then fits a batch in seconds
FITTABLE = ModelConfig(vision=VisionConfig(image_size=64), max_new_tokens=24,
                       lora=LoRAConfig(r=8, alpha=16, target_modules=EVERY_LINEAR, modules_to_save=["lm_head"]))


def scores(caption: float, vqa: float, grounding: float, **override: float) -> dict[str, float]:
    by_task = {"caption": caption, "vqa": vqa, "grounding": grounding}
    return {key: override.get(key, by_task[TASK_OF[key]]) for key in EVAL_KEYS}


# intervals of a paired difference to a baseline, and what `intervals.verdict` calls them
BETTER, NOT_SIGNIFICANT, WORSE = (1.0, 9.0), (-2.0, 3.0), (-4.0, -0.5)


def vs_trivial(keys, by: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """The paired difference of each split's primary metric to its task's trivial baseline, with its
    interval, named as the evaluation logs it: `by` bench split or task (default BETTER)."""
    out = {}
    for key in keys:
        task = TASK_OF[key]
        low, high = (by or {}).get(key, (by or {}).get(task, BETTER))
        d = delta_metric(key, PRIMARY[task], TRIVIAL[task])
        out |= dict(zip((d, *ci_bounds(d)), ((low + high) / 2, low, high), strict=True))
    return out


def eval_run(model_dir: Path, primaries: dict[str, float], md5: str = "md5-good", status: str = "FINISHED",
             kind: str = "evaluation", training_run: str = "", trivial: dict[str, tuple[float, float]] | None = None
             ) -> str:
    """An evaluation run as skyeye/evaluation/runner.py writes it (the contract's tags and metric names);
    `trivial`: the intervals of the differences to the trivial baselines (`vs_trivial`)."""
    client = MlflowClient()
    tags = {"skyeye.kind": kind, "skyeye.model_dir": str(model_dir), "skyeye.eval.training_run": training_run,
            "skyeye.data.dvc_md5": md5, "skyeye.data.git_rev": "rev-" + md5, "skyeye.eval.benchmarks":
            ",".join(primaries)}
    run = client.create_run(runs.experiment_id("skyeye-evaluation"), tags=tags)
    metrics = {f"{k}/{PRIMARY[TASK_OF[k]]}": v for k, v in primaries.items()}
    if primaries:
        metrics["primary_score"] = sum(primaries.values()) / len(primaries)
    metrics |= vs_trivial(primaries, trivial)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def overfit(model, convs: list[tuple[str, str]], images: list, steps: int = 40, lr: float = 1e-2) -> list[float]:
    """Teach `model` one fixed batch of (question, answer) turns about `images`; the losses per step."""
    from skyeye.training.loop import per_sample_loss
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    batch = collate([encode_conversation(tok, [c], n) for c in convs], tok.pad_token_id)
    px = model.preprocess(images)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # cosine decay to zero: the last steps settle instead of bouncing around the fit
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    model.train()
    losses = []
    for _ in range(steps):
        loss = per_sample_loss(model(batch["input_ids"], batch["attention_mask"], px).logits, batch["labels"]).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def fitted_model(backbones: dict[str, str], convs: list[tuple[str, str]], images: list, seed: int = 0):
    """A dim-64 SkyEyeGPT that answers `convs` about `images` (greedy); checked before it is returned."""
    torch.manual_seed(seed)
    model = build_model(FITTABLE, backbones["vision"], backbones["llm"], backbones["tokenizer"])
    overfit(model, convs, images, steps=80)
    model.eval()
    answers = model.ask([q for q, _ in convs], pixel_values=model.preprocess(images))
    assert answers == [a for _, a in convs], f"the dim-64 model answered {answers} after 80 steps on {convs}"
    return model


def eval_run_with_items(model_dir: Path, stats: dict, md5: str = "md5-good") -> str:
    """An evaluation run holding per-item statistics (`{bench_split: ItemStats}`, the model's), as
    the evaluation keeps them, with the primary metrics they give."""
    from skyeye.evaluation.comparison import MODEL, save_item_stats
    run_id = eval_run(model_dir, {k: s.scores[PRIMARY[TASK_OF[k]]] for k, s in stats.items()}, md5=md5)
    save_item_stats(run_id, {k: {MODEL: s} for k, s in stats.items()})
    return run_id


def write_log_rows(store: Path, rows: list[dict], name: str = "test") -> None:
    """Rows of the inference log (monitoring.log_schema.SCHEMA; unnamed columns null) written as
    serving writes them: a Parquet file per day partition under `store`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skyeye.monitoring.log_schema import SCHEMA, partition_of
    by_day: dict[str, list[dict]] = {}
    for row in rows:
        by_day.setdefault(partition_of(row["time"]), []).append(row)
    for day, day_rows in by_day.items():
        folder = Path(store) / day
        folder.mkdir(parents=True, exist_ok=True)
        # a null image_signature (a fixed-size list) is written but not read back by pyarrow 25: zeros instead
        table = pa.Table.from_pylist([{f: r.get(f) for f in SCHEMA.names} | {"image_signature": r.get(
            "image_signature", [0.0] * SCHEMA.field("image_signature").type.list_size)} for r in day_rows],
            schema=SCHEMA)
        pq.write_table(table, folder / f"{name}-{len(list(folder.iterdir()))}.parquet")
