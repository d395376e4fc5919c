"""How well do the drift tests separate planted shifts from unshifted traffic? Prints JSON.

A tiny SkyEye-Synth corpus (seed 0) is the training data; the windows are requests drawn from
a second corpus (seed 1: new images of the same world) as `skyeye serve` would log them
(tests/inference_rows.py writes them, the monitor reads them), under dim-64 models whose random
frozen encoders differ by `--encoders` seeds. Per encoder, window size and scenario
(`unshifted`: the seed-1 corpus, `unshifted_training`: the training corpus's own questions and
images, `recoloured`: red and blue swapped, `inverted`: a negative, `one_benchmark`: DIOR-RSVG
images only), the monitor's figures (`drift.compare`: signatures standardised by the reference)
and `p_raw`, the energy test on raw signatures. `--plot` writes the monitor's own overview plot
(skyeye/monitoring/plots.py) of encoder 0's inverted window of the largest size.

    python bench/drift_probe.py [--encoders 5] [--sizes 100,200] [--plot docs/drift_monitor.png]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inference_rows import invert, one_benchmark, recolour, rows, unshifted, write_log  # noqa: E402

from skyeye.data.instructions import build  # noqa: E402
from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig  # noqa: E402
from skyeye.model.skyeyegpt import build_model  # noqa: E402
from skyeye.model.tiny import TinyLLMSpec, TinyVisionSpec, save_random_backbones  # noqa: E402
from skyeye.model.tokenizer import instruction_texts, train_tokenizer  # noqa: E402
from skyeye.monitoring.config import MonitorConfig  # noqa: E402
from skyeye.monitoring.drift import compare, energy_test, window_of  # noqa: E402
from skyeye.monitoring.log_schema import read_log  # noqa: E402
from skyeye.monitoring.reference import build_reference  # noqa: E402
from skyeye.synth.corpus import synthesize  # noqa: E402

START = datetime(2026, 12, 5, 0, 0, tzinfo=UTC)


def corpus(folder: Path, seed: int) -> Path:
    synthesize(folder / "synth", scale="tiny", seed=seed, workers=1, progress=False)
    build(folder / "synth", folder / "instructions")
    return folder / "instructions"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", type=int, default=5)
    ap.add_argument("--sizes", default="100,200")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    cfg = MonitorConfig(min_rows=20, reference_images=64, permutations=500)
    out = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(), "reference_images": cfg.reference_images,
           "permutations": cfg.permutations, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, fresh = corpus(tmp / "train", 0), corpus(tmp / "fresh", 1)
        tok = train_tokenizer(instruction_texts([train / "stage1.json"]), tmp / "tok", 400)
        for enc in range(args.encoders):
            torch.manual_seed(enc)
            paths = save_random_backbones(tmp / f"bb{enc}", tok, TinyVisionSpec(
                image_size=64, patch_size=16, hidden_size=64, layers=2, heads=2), TinyLLMSpec(
                hidden_size=64, layers=2, heads=2, intermediate_size=128))
            model = build_model(ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16)),
                                paths["vision"], paths["llm"], paths["llm"]).eval()
            ref = build_reference(lambda rel: (train.parent / rel.removeprefix("data/")).read_bytes(), model, cfg)
            sizes = [int(s) for s in args.sizes.split(",")]
            for n in sizes:
                requests = unshifted(fresh, n, seed=100 + enc)
                for name, reqs, kw in (("unshifted", requests, {}),
                                       ("unshifted_training", unshifted(train, n, seed=200 + enc), {}),
                                       ("recoloured", requests, {"recoloured": recolour}),
                                       ("inverted", requests, {"recoloured": invert}),
                                       ("one_benchmark", one_benchmark(requests, "dior_rsvg"), {})):
                    store = tmp / f"log-{enc}-{n}-{name}"
                    write_log(store, rows(model, reqs, START, **kw))
                    window, answers = window_of(read_log(str(store)))
                    report = compare(ref, window, answers, cfg)
                    _, p_raw, _ = energy_test(ref.signatures, window.signatures, cfg.permutations, cfg.seed)
                    row = {"encoder": enc, "n": n, "scenario": name, "p_raw": round(p_raw, 4),
                           "drifted": report.drifted}
                    row |= {k: round(v, 4) for k, v in report.metrics().items() if not k.endswith("_drifted")}
                    out["results"].append(row)
                    print(json.dumps(row), file=sys.stderr)
                    if args.plot and enc == 0 and name == "inverted" and n == max(sizes):
                        from skyeye.monitoring.plots import draw
                        files = draw(report, tmp / "plots", f"drift monitor: {n} requests about inverted images "
                                                            "against the training data (bench/drift_probe.py)")
                        shutil.copy(files[-1], args.plot)
    summary = {}
    for r in out["results"]:
        key = f"{r['scenario']} n={r['n']}"
        s = summary.setdefault(key, {"detected_standardised": 0, "detected_raw": 0, "encoders": 0, "p": []})
        s["encoders"] += 1
        s["detected_standardised"] += r["image_content_p"] < cfg.thresholds.image_content_p
        s["detected_raw"] += r["p_raw"] < cfg.thresholds.image_content_p
        s["p"].append(r["image_content_p"])
    out["summary"] = {k: v | {"p_median": float(np.median(v.pop("p")))} for k, v in summary.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
