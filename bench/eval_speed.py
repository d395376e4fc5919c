"""Evaluation speed: batched greedy generation with a KV cache against one sample at a
time, on the same model and prompts; optionally the wall time of the full 8-benchmark
evaluation (with its baselines) at the corpus's scale, and what its bootstrap intervals and
paired differences add to it (target: at most 25%). Prints JSON.

    python bench/eval_speed.py --model <model folder | run id | models:/skyeyegpt@production> [--full]

Batched and single-sample answers are also compared: left padding must not change them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from skyeye.config import configure_environment, get_settings
from skyeye.evaluation.predictors import ModelPredictor
from skyeye.evaluation.runner import EvalConfig, load_eval_file, run_evaluation
from skyeye.formats.benchmarks import TASK_OF
from skyeye.model.references import load


def prompts_mix(instructions: Path, per_task: int) -> list[tuple[str, dict, int]]:
    """`per_task` rows each of grounding, VQA and captioning, with their answer budgets."""
    budget = EvalConfig().max_new_tokens
    out = []
    for key in ("dior_rsvg_test", "rsvqa_lr_test", "ucm_captions_test"):
        rows = load_eval_file(instructions, key)["samples"][:per_task]
        out += [(key, r, budget[TASK_OF[key]]) for r in rows]
    return out


def timed(predictor: ModelPredictor, root: Path, mix, repeats: int) -> tuple[list[float], list[str]]:
    times, answers = [], []
    for _ in range(repeats):
        answers = []
        start = time.perf_counter()
        for key in dict.fromkeys(k for k, _, _ in mix):  # one task at a time, as the evaluation does
            rows = [r for k, r, _ in mix if k == key]
            budget = next(b for k, _, b in mix if k == key)
            answers += predictor.answer(root, rows, [r["prompt"] for r in rows], budget)
        times.append(time.perf_counter() - start)
    return times, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--per-task", type=int, default=32, help="samples per task (3 tasks)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--full", action="store_true", help="also time the full 8-benchmark evaluation")
    args = parser.parse_args()
    s = configure_environment(get_settings())
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    model, folder = loaded.model, loaded.source
    root = s.instructions_dir / "eval"
    mix = prompts_mix(s.instructions_dir, args.per_task)
    cache: dict = {}  # the encoder output is shared: the comparison is about generation
    batched = ModelPredictor(model, batch_size=args.batch_size, encoder_cache=cache)
    single = ModelPredictor(model, batch_size=1, encoder_cache=cache)
    timed(batched, root, mix[:4], 1)  # warm-up: encoder cache, kernels
    t_batched, a_batched = timed(batched, root, mix, args.repeats)
    t_single, a_single = timed(single, root, mix, args.repeats)
    n = len(mix)
    out = {"model": folder, "samples": n, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "batched_s_median": statistics.median(t_batched), "single_s_median": statistics.median(t_single),
           "batched_samples_per_s": n / statistics.median(t_batched),
           "single_samples_per_s": n / statistics.median(t_single),
           "speedup": statistics.median(t_single) / statistics.median(t_batched),
           "answers_identical_share": sum(a == b for a, b in zip(a_batched, a_single, strict=True)) / n}
    if args.full:
        start = time.perf_counter()
        result = run_evaluation(args.model, "all", progress=False)
        total = time.perf_counter() - start
        from skyeye.tracking import runs
        intervals = runs.client().get_run(result.run_id).data.metrics["interval_seconds"]
        out |= {"full_evaluation_s": total, "full_evaluation_run": result.run_id,
                "full_evaluation_samples": sum(len(p) for p in result.predictions.values()),
                "intervals_s": intervals, "intervals_added_share": intervals / (total - intervals)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
