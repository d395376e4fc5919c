"""What the inference log costs per request, measured on the writer alone (no server, so
little of the machine's noise): the time a request spends handing its row over (`record`),
and the CPU the whole log spends per row (the hand-over, the writer thread's perceptual
hash, Parquet encoding and the file writes), for a small and a DIOR-sized image. Prints JSON.

    python bench/inference_log_cost.py [--rows 5000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry


def _row(i: int) -> dict:
    question = "[refer] the red vehicle left of the road"
    return {"time": datetime.now(UTC), "request_id": f"chatcmpl-{i:032d}", "model": "skyeyegpt", "version": 1,
            "role": "production", "task": "refer", "prompt": question, "prompt_chars": len(question),
            "prompt_tokens": 60, "image_signature": [0.5] * 16, "answer": "{<10><20><30><40>}",
            "boxes": json.dumps([{"phrase": None, "grid": [10, 20, 30, 40], "pixels": [80, 160, 240, 320]}]),
            "completion_tokens": 9, "finish_reason": "stop", "latency_ms": 120.0, "status": 200, "error": None}


def measure(side: int, rows: int) -> dict:
    from skyeye.serving.config import InferenceLogConfig
    from skyeye.serving.inference_log import InferenceLog, metrics
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as store:
        counters = metrics(CollectorRegistry())
        log = InferenceLog(store, InferenceLogConfig(queue_rows=rows), "bench", counters)
        cpu, wall, handover = time.process_time(), time.perf_counter(), 0.0
        for i in range(rows):
            t = time.perf_counter()
            log.record(_row(i), image)
            handover += time.perf_counter() - t
        assert log.close(timeout_s=600)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert counters["log_rows"]._value.get() == rows
    return {"image": f"{side}x{side}", "rows": rows, "record_us_per_row": round(handover / rows * 1e6, 1),
            "cpu_ms_per_row": round(cpu / rows * 1e3, 3), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    args = parser.parse_args()
    print(json.dumps([measure(side, args.rows) for side in (64, 800)], indent=1))


if __name__ == "__main__":
    main()
