"""Training speed: (a) the stage loop in one plain process, (b) Ray Train with 1 worker,
(c) Ray Train with 2 workers, at equal total cores; the ratios (b)/(a) and (c)/(a);
Ray start-up time; and the training step's achieved FLOP/s against a dense matmul
measured in the same run. Prints JSON.

    python bench/train_speed.py [--steps 40] [--model configs/model/tiny.yaml]

Needs the demo corpus (data/) and the tiny backbones (`skyeye backbones`); runs
against a throw-away MLflow store, so the project's runs are not touched.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from skyeye.config import DEFAULT_MODEL_FILE


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(model_file: Path, backbones: dict, instructions: Path, batch: int) -> float:
    """FLOPs of one training step (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from skyeye.data.items import load_items
    from skyeye.model.config import load_model_config
    from skyeye.model.skyeyegpt import build_model
    from skyeye.model.template import collate, encode_conversation
    from skyeye.training.data import PixelCache
    from skyeye.training.loop import VisualFeatures, per_sample_loss
    cfg = load_model_config(model_file)
    model = build_model(cfg, backbones["vision"], backbones["llm"], backbones["tokenizer"])
    items = load_items(instructions / "stage1.json")[:batch]
    n = model.visual_tokens_per_image()
    feats = VisualFeatures(model, PixelCache(instructions, cfg.vision.image_size), True)
    vis, frames = feats.batch([(it.media, it.frames) for it in items])
    b = collate([encode_conversation(model.tokenizer, list(it.turns), n * it.frames) for it in items],
                model.tokenizer.pad_token_id)
    with FlopCounterMode(display=False) as counter:
        out = model(b["input_ids"], b["attention_mask"], frames=frames, vision_tokens=vis)
        per_sample_loss(out.logits, b["labels"]).mean().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default=DEFAULT_MODEL_FILE)
    parser.add_argument("--stage", default="configs/train/stage1.yaml")
    args = parser.parse_args()

    from skyeye.config import get_settings
    from skyeye.model.config import load_model_config
    from skyeye.training.jobs import prepare_backbones
    from skyeye.training.loop import run_stage
    from skyeye.training.ray_train import FitConfig, fit, fit_local
    from skyeye.training.stage_config import load_stage_config

    s = get_settings()
    backbones = prepare_backbones(Path(args.model))
    stage = load_stage_config(args.stage).model_copy(update={
        "max_steps": args.steps, "time_budget_s": None, "warmup_steps": 5, "log_every": 10,
        "checkpoint_every": 10 ** 9, "validation": {"grounding": None, "vqa": None, "caption": None}})
    model_cfg = load_model_config(args.model).model_dump(mode="json")
    loop_config = {"stage": stage.model_dump(mode="json"), "model": model_cfg,
                   "instructions": str(s.instructions_dir), "backbones": backbones, "init": None}
    cores = os.cpu_count() or 2
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/bench.db"
        from mlflow.tracking import MlflowClient
        client = MlflowClient(uri)
        exp = client.create_experiment("bench")
        variants = (("a_plain", fit_local, 1), ("b_ray_1_worker", fit, 1), ("c_ray_2_workers", fit, 2))
        for name, runner, workers in variants:
            run = client.create_run(exp, run_name=name)
            cfg = FitConfig(num_workers=workers, cpus_per_worker=cores / workers, storage_path=f"{tmp}/{name}",
                            mlflow_tracking_uri=uri, mlflow_run_id=run.info.run_id,
                            env={"OMP_NUM_THREADS": str(cores // workers)})
            torch.set_num_threads(cores)
            start = time.perf_counter()
            result = runner(run_stage, loop_config, cfg)
            wall = time.perf_counter() - start
            hist = client.get_metric_history(run.info.run_id, "step_time_s")
            tps = client.get_metric_history(run.info.run_id, "tokens_per_s")
            # skip the first window: it holds the one-off encoding of the images (feature cache)
            steady = [m.value for m in hist[1:]] or [m.value for m in hist]
            results[name] = {"workers": workers, "step_time_s_median": statistics.median(steady),
                             "tokens_per_s_last": tps[-1].value if tps else None,
                             "startup_s": result.startup_seconds, "wall_s": wall}
    a = results["a_plain"]["step_time_s_median"]
    flops = step_flops(Path(args.model), backbones, s.instructions_dir, stage.batch_size)
    dense = matmul_flops()
    print(json.dumps({
        "steps": args.steps, "global_batch": stage.batch_size, "cores": cores, "runs": results,
        "ratio_b_over_a_step_time": results["b_ray_1_worker"]["step_time_s_median"] / a,
        "ratio_c_over_a_step_time": results["c_ray_2_workers"]["step_time_s_median"] / a,
        "ray_startup_s": results["b_ray_1_worker"]["startup_s"],
        "step_flops": flops, "achieved_flops_per_s_plain": flops / a,
        "dense_matmul_flops_per_s": dense, "achieved_over_dense": flops / a / dense,
    }, indent=1))


if __name__ == "__main__":
    main()
