"""Evaluation scaling: the same items scored in this process (`--num-workers 1`; torch's
default threads, and 1 thread), by 1 Ray worker and by 2 Ray workers (1 thread each); the
model's per-item cost per task (median seconds per item over its batches), the times and
ratios, whether all runs' scores are identical, and the projected time of the real test
sets by worker count. Prints JSON.

    python bench/eval_scaling.py [--model <folder | run id | models:/skyeyegpt@production>] [--limit 64]

Without --model it builds a throw-away project (like bench/train_speed.py, nothing of the
project's is touched): the demo corpus (SkyEye-Synth, demo scale) and a model of the demo's
architecture (configs/model/tiny.yaml) on random backbones. An untrained model answers up to
each task's token budget, so its per-item cost is an upper bound for the trained demo model.
Baselines are off: the untuned model is capped at 100 rows per split and the trivial answers
cost nothing next to generation, so at the real sets' sizes the model's answers are the work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# Items per scored test split of the real data sets, and where each number comes from.
_BIG_VISION = "google-research/big_vision big_vision/datasets/{}/{}.py docstring (TFDS build of the Zenodo release)"
_RSVG_README = "github.com/ZhanYang-nwpu/RSVG-pytorch README, dataset statistics table"
_SYNTH_FULL = ("skyeye/synth/corpus.py SCALES['full'] (the real set's image count) x its test share (SPLIT_SHARES), "
               "one item per test image")
REAL_TEST_ITEMS: dict[str, tuple[int | None, str]] = {
    "rsvqa_hr_test": (222_684, _BIG_VISION.format("rsvqa_hr", "rsvqa_hr") + ", split test"),
    "rsvqa_hr_test_phili": (105_647, _BIG_VISION.format("rsvqa_hr", "rsvqa_hr") + ", split test_2 (Philadelphia)"),
    "rsvqa_lr_test": (10_004, _BIG_VISION.format("rsvqa_lr", "rsvqa_lr") + ", split test"),
    "rsvg_val": (1_201, _RSVG_README + ", row RSVG (Sun et al. 2022)"),
    "rsvg_test": (1_227, _RSVG_README + ", row RSVG (Sun et al. 2022)"),
    "dior_rsvg_test": (7_500, _RSVG_README + ", row DIOR-RSVG"),
    "ucm_captions_test": (None, _SYNTH_FULL),  # None: computed from the corpus's full scale below
    "sydney_captions_test": (None, _SYNTH_FULL),
    "rsicd_test": (None, _SYNTH_FULL),
    "capera_test": (None, _SYNTH_FULL),
}
PROJECTED_WORKERS = (1, 2, 4, 8, 16, 32)


def real_test_items() -> dict[str, dict]:
    from skyeye.synth.corpus import SCALES, SPLIT_SHARES, split_of
    out = {}
    for key, (n, source) in REAL_TEST_ITEMS.items():
        if n is None:
            images = SCALES["full"].images[key.removesuffix("_test")]
            n = sum(split_of(i, images, SPLIT_SHARES["captions"]) == "test" for i in range(images))
        out[key] = {"items": n, "source": source}
    return out


def throwaway_model(root: Path) -> str:
    """The demo corpus and a model of the demo's architecture on random backbones, under `root`."""
    import torch

    from skyeye.data.instructions import build
    from skyeye.model.config import load_model_config
    from skyeye.model.skyeyegpt import build_model
    from skyeye.model.tiny import save_random_backbones
    from skyeye.model.tokenizer import instruction_texts, train_tokenizer
    from skyeye.synth.corpus import synthesize
    synthesize(root / "data" / "synth", scale="demo", seed=0, progress=False)
    build(root / "data" / "synth", root / "data" / "instructions")
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml")
    inst = root / "data" / "instructions"
    tok = train_tokenizer(instruction_texts([inst / "stage1.json", inst / "stage2.json"]), root / "tok",
                          cfg.backbones.vocab_size)
    paths = save_random_backbones(root / "backbones", tok, cfg.backbones.vision, cfg.backbones.llm)
    torch.manual_seed(0)
    return str(build_model(cfg, paths["vision"], paths["llm"], paths["llm"]).eval().save(root / "model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: a throw-away model (see above)")
    parser.add_argument("--limit", type=int, default=64, help="items per bench split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="evaluations per variant (one start-up each)")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="eval-scaling-")
    if args.model is None:  # a throw-away project: its own data and MLflow store
        os.environ["SKYEYE_PROJECT_ROOT"] = tmp.name
        os.environ["SKYEYE_MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp.name}/mlflow.db"
    from skyeye.config import configure_environment, get_settings
    get_settings.cache_clear()
    s = configure_environment(get_settings())
    started = time.perf_counter()
    ref = args.model or throwaway_model(Path(tmp.name))
    setup_s = time.perf_counter() - started
    out = run(ref, s, args.limit, args.batch_size, args.repeats)
    out |= {"model": ref if args.model else "throw-away: configs/model/tiny.yaml architecture, random backbones",
            "setup_s": round(setup_s, 1)}
    print(json.dumps(out, indent=1))
    tmp.cleanup()


def scoring_costs(result, instructions: Path, limit: int) -> dict[str, float]:
    """The driver's scoring of these answers again, in seconds per item by task (scorer started)."""
    from skyeye.evaluation.metrics import CaptionScorer
    from skyeye.evaluation.runner import load_eval_file, score
    from skyeye.formats.benchmarks import TASK_OF, spread
    rows_of = {k: spread(load_eval_file(instructions, k)["samples"], limit) for k in result.predictions}
    answers = {k: [r["prediction"] for r in p] for k, p in result.predictions.items()}
    took: dict[str, list[tuple[float, int]]] = {}
    scorer = CaptionScorer()
    try:
        for i, key in enumerate(list(rows_of) + list(rows_of)):  # the first pass warms up the scorer
            t = time.perf_counter()
            score(key, rows_of[key], answers[key], scorer)
            if i >= len(rows_of):
                took.setdefault(TASK_OF[key], []).append((time.perf_counter() - t, len(rows_of[key])))
    finally:
        scorer.close()
    return {task: sum(t for t, _ in v) / sum(n for _, n in v) for task, v in took.items()}


def run(ref: str, s, limit: int, batch_size: int, repeats: int) -> dict:
    import torch

    from skyeye.evaluation.predictors import ModelPredictor
    from skyeye.evaluation.runner import EvalConfig, evaluate_with
    from skyeye.evaluation.sharding import ShardedPredictor, resolve_ref, worker_pool
    from skyeye.formats.benchmarks import TASK_OF
    from skyeye.model.references import load

    cfg = EvalConfig(limit=limit, batch_size=batch_size, baselines=())
    task_of_budget = {b: t for t, b in cfg.max_new_tokens.items()}
    assert len(task_of_budget) == len(cfg.max_new_tokens), "the answer budgets no longer tell the tasks apart"

    class Timed(ModelPredictor):
        """The in-process predictor, timing each batch: seconds per item by task."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.per_item: dict[str, list[float]] = {}
            self.seconds = 0.0  # all batches of all repeats: the model's share of the evaluations

        def answer(self, root, rows, prompts, max_new_tokens, progress=None):
            out = []
            for i in range(0, len(rows), self.batch_size):
                batch = slice(i, i + self.batch_size)
                t = time.perf_counter()
                out += super().answer(root, rows[batch], prompts[batch], max_new_tokens, progress)
                took = time.perf_counter() - t
                self.seconds += took
                self.per_item.setdefault(task_of_budget[max_new_tokens], []).append(took / len(rows[batch]))
            return out

    common = {"cfg": cfg, "settings": s, "progress": False}
    runs: dict[str, dict] = {}
    results = {}

    def repeated(name: str, ours, model_ref: str) -> list[float]:
        seconds = []
        for _ in range(repeats):
            results[name] = evaluate_with(ours, None, "all", model_ref=model_ref, **common)
            seconds.append(results[name].seconds)
        return seconds

    default_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    loaded = load(ref)  # as `skyeye evaluate --num-workers 1` does
    load_s = time.perf_counter() - t0
    timed = {}
    for name, threads in (("in_process", default_threads), ("in_process_1_thread", 1)):
        torch.set_num_threads(threads)
        timed[name] = Timed(loaded.model, batch_size=batch_size)
        runs[name] = {"workers": 1, "threads": threads, "startup_s": load_s,
                      "eval_s": repeated(name, timed[name], loaded.source)}
    torch.set_num_threads(default_threads)
    del loaded
    model = resolve_ref(ref)  # as `--num-workers N` does
    for name, workers in (("ray_1_worker", 1), ("ray_2_workers", 2)):  # one thread (and CPU) per worker
        t0 = time.perf_counter()
        with worker_pool(model, workers, untuned=False, batch_size=batch_size, settings=s, cpus_per_worker=1) as pool:
            startup = time.perf_counter() - t0
            runs[name] = {"workers": workers, "threads": 1, "startup_s": startup,
                          "eval_s": repeated(name, ShardedPredictor(pool), model.source)}
    for r in runs.values():
        r["eval_s_median"] = statistics.median(r["eval_s"])
        r["first_wall_s"] = r["startup_s"] + r["eval_s"][0]  # what one `skyeye evaluate` costs
        for k, v in r.items():
            r[k] = round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v] if isinstance(v, list) else v

    base = results["in_process"]
    one = timed["in_process_1_thread"]  # the projection's unit: one single-thread process (= one worker)
    items = {k: len(p) for k, p in base.predictions.items()}
    per_item = {t: statistics.median(v) for t, v in one.per_item.items()}
    model_s = one.seconds / repeats
    score_per_item = scoring_costs(base, s.instructions_dir, limit)
    scoring_s = sum(n * score_per_item[TASK_OF[k]] for k, n in items.items())
    # scorer start, report, logging: what the 1-thread in-process evaluation spent besides answering and scoring
    fixed_s = max(0.0, runs["in_process_1_thread"]["eval_s_median"] - model_s - scoring_s)
    med = {name: r["eval_s_median"] for name, r in runs.items()}
    ratio = {"eval_ray_1_worker_over_ray_2_workers": med["ray_1_worker"] / med["ray_2_workers"],
             "eval_in_process_1_thread_over_ray_2_workers": med["in_process_1_thread"] / med["ray_2_workers"],
             "eval_in_process_over_ray_2_workers": med["in_process"] / med["ray_2_workers"],
             "eval_in_process_over_in_process_1_thread": med["in_process"] / med["in_process_1_thread"],
             "first_wall_in_process_over_ray_2_workers":
                 runs["in_process"]["first_wall_s"] / runs["ray_2_workers"]["first_wall_s"]}

    real = real_test_items()
    startup_s = runs["ray_2_workers"]["startup_s"]

    def projected(keys: list[str]) -> dict:
        work = sum(real[k]["items"] * per_item[TASK_OF[k]] for k in keys)
        driver = fixed_s + sum(real[k]["items"] * score_per_item[TASK_OF[k]] for k in keys)
        out = {str(n): round(load_s + work + driver if n == 1 else startup_s + work / n + driver)
               for n in PROJECTED_WORKERS}
        return {"items": sum(real[k]["items"] for k in keys), "model_s_one_worker": round(work),
                "driver_s": round(driver), "seconds_by_workers": out,
                "hours_by_workers": {n: round(v / 3600, 2) for n, v in out.items()},
                "this_machine_2_workers_s": round(
                    startup_s + (work + driver) / ratio["eval_in_process_1_thread_over_ray_2_workers"])}

    return {
        "commit": _commit(), "cores": os.cpu_count(), "batch_size": batch_size, "limit_per_split": limit,
        "repeats": repeats, "items": items, "items_total": sum(items.values()),
        "per_item_s_median": {name: {t: round(statistics.median(v), 5) for t, v in p.per_item.items()}
                              for name, p in timed.items()},
        "per_item_batches": {t: len(v) for t, v in one.per_item.items()},
        "scoring_s_per_item": {t: round(v, 6) for t, v in score_per_item.items()},
        "in_process_1_thread_split": {"model_s": round(model_s, 2), "scoring_s": round(scoring_s, 2),
                                      "fixed_s": round(fixed_s, 2)},
        "runs": runs, "ratios": {k: round(v, 3) for k, v in ratio.items()},
        "scores_identical": all(r.metrics == base.metrics for r in results.values()),
        "predictions_identical": all(r.predictions == base.predictions for r in results.values()),
        "real_test_sets": real,
        "projection": {
            "model": "time(N) = start-up (N=1: loading the model in process; N>1: Ray start and the model "
                     "loads, as measured with 2 workers) + sum over splits of items x the task's per-item "
                     "median in one single-thread process / N + the driver (fixed part as measured, plus "
                     "scoring per item by task). Assumes each worker has its own core (or GPU), as fast as "
                     "the process measured here; this_machine_2_workers_s applies instead the 1-thread "
                     "in-process / 2-worker ratio measured here on 2 shared cores.",
            "all_scored_test_splits": projected(list(real)),
            "rsvqa_hr_test_sets": projected(["rsvqa_hr_test", "rsvqa_hr_test_phili"]),
        },
    }


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
