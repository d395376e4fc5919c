"""Inference-log rows for the drift tests, written as `skyeye serve` logs them
(skyeye/monitoring/log_schema.py: Parquet by day): requests drawn from a tiny instruction set,
their images' real encoder signatures under a tiny model, and answers as a test wants them.

- `unshifted`: questions and images of an instruction set synthesized with another seed;
- `recolour`: the same images with red and blue swapped (another sensor's colours);
- `one_benchmark`: only the images of one benchmark (traffic from another source)."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from skyeye.formats.prompts import IMAGE_PLACEHOLDER
from skyeye.monitoring.drift import BOX_TASKS, task_identifier
from skyeye.monitoring.log_schema import SCHEMA, partition_of
from skyeye.monitoring.signals import image_signature, perceptual_hash


def unshifted(instructions: Path, n: int, seed: int = 1) -> list[dict]:
    """n requests drawn from the questions of an instruction set, each about its own image. From
    a corpus synthesized with another seed (`fresh_instructions`): the world the model was
    trained on, on images it never saw. (The tiny corpus's test splits hold 1-3 images per
    benchmark: traffic made of them is a shift of its own.)"""
    asked = []
    for name in ("stage1.json", "stage2.json"):
        for r in json.loads((instructions / name).read_text()):
            if "image" in r:
                asked += [(t["value"].replace(IMAGE_PLACEHOLDER, "").strip(), (instructions / r["image"]).resolve(),
                           r["source"]) for t in r["conversations"] if t["from"] == "human"]
    rng = np.random.default_rng(seed)
    return [dict(zip(("question", "image", "source"), asked[i], strict=True))
            for i in rng.choice(len(asked), n, replace=len(asked) < n)]


def one_benchmark(requests: list[dict], source: str) -> list[dict]:
    """The same questions, every image one of `source`'s."""
    images = [r["image"] for r in requests if r["source"] == source]
    return [r | {"image": images[i % len(images)]} for i, r in enumerate(requests)]


def recolour(image: Image.Image) -> Image.Image:
    """Red and blue swapped: another sensor's colours."""
    r, g, b = image.convert("RGB").split()
    return Image.merge("RGB", (b, g, r))


def invert(image: Image.Image) -> Image.Image:
    """A negative: a gross re-colouring."""
    from PIL import ImageOps
    return ImageOps.invert(image.convert("RGB"))


def rows(model, requests: list[dict], start: datetime, every: timedelta = timedelta(minutes=1), *,
         recoloured=None, bad_boxes: float = 0.0, cut: float = 0.0, role: str = "production") -> list[dict]:
    """Log rows of `requests` answered by version 1 from `start` on, `every` apart: a box (or, for
    a `bad_boxes` share, words) for [refer]/[detection], `cut` of the answers at the token limit;
    `recoloured`: a function applied to every image (`recolour`, `invert`)."""
    images = [Image.open(r["image"]).convert("RGB") for r in requests]
    if recoloured:
        images = [recoloured(im) for im in images]
    signatures = image_signature(model, images)
    out = []
    for i, (r, im, sig) in enumerate(zip(requests, images, signatures, strict=True)):
        task = task_identifier(r["question"])
        boxed = task in BOX_TASKS and (i + 0.5) / len(requests) >= bad_boxes
        answer = "{<10><20><30><40>}" if boxed else "a few buildings near the road"
        out.append({"time": start + i * every, "request_id": uuid.uuid4().hex, "model": "skyeyegpt", "version": 1,
                    "role": role, "task": task, "prompt": r["question"], "prompt_chars": len(r["question"]),
                    "prompt_tokens": len(r["question"].split()), "image_phash": perceptual_hash(im),
                    "image_width": im.width, "image_height": im.height, "image_signature": sig.tolist(),
                    "image_path": None, "answer": answer, "boxes": "[]", "completion_tokens": 8,
                    "finish_reason": "length" if (i + 0.5) / len(requests) < cut else "stop",
                    "latency_ms": 120.0, "status": 200, "error": None})
    return out


def write_log(store: Path, log_rows: list[dict], writer: str = "test") -> list[Path]:
    """Parquet day partitions `<store>/date=YYYY-MM-DD/<writer>-<n>.parquet`; the files."""
    by_day: dict[str, list[dict]] = {}
    for row in log_rows:
        by_day.setdefault(partition_of(row["time"]), []).append(row)
    out = []
    for day, day_rows in sorted(by_day.items()):
        folder = Path(store) / day
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{writer}-{len(list(folder.glob('*.parquet')))}.parquet"
        pq.write_table(pa.Table.from_pylist(day_rows, schema=SCHEMA), path)
        out.append(path)
    return out
