"""Benchmark of the data steps at a given scale: synth, build, validate (the GX gate),
and validation throughput. Prints JSON with the median of `--repeats` runs of each step.

    python bench/data_steps.py [--scale demo] [--repeats 3]

Runs in a temporary folder: the project's data/ and MLflow store are not touched.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from skyeye.config import SCALE_NAMES
from skyeye.data.instructions import build
from skyeye.datagate.expectations import validate
from skyeye.synth.corpus import synthesize


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="demo", choices=SCALE_NAMES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth_s, synth_all, _ = timed(lambda: synthesize(root / "synth", scale=args.scale, progress=False),
                                      args.repeats)
        build_s, build_all, card = timed(lambda: build(root / "synth", root / "instructions"), args.repeats)
        validate_s, validate_all, result = timed(lambda: validate(root / "instructions", root / "gx"), args.repeats)
        records = result.n_records
        print(json.dumps({
            "scale": args.scale, "repeats": args.repeats,
            "synth_s": round(synth_s, 2), "build_s": round(build_s, 2), "validate_s": round(validate_s, 2),
            "data_steps_total_s": round(synth_s + build_s + validate_s, 2),
            "validation_records": records, "validation_records_per_s": round(records / validate_s, 1),
            "validation_passed": result.success,
            "stage1_samples": card["stage1"]["total"], "stage2_samples": card["stage2"]["total"],
            "runs_s": {"synth": [round(t, 2) for t in synth_all], "build": [round(t, 2) for t in build_all],
                       "validate": [round(t, 2) for t in validate_all]},
        }, indent=1))


if __name__ == "__main__":
    main()
