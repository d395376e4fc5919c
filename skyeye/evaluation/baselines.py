"""The trivial baselines that give every score its context, one implementation each,
used by the 8-benchmark evaluation and by training's validation scores alike:

- `majority_answer` (VQA): each question type's most frequent answer, counted on the
  test file itself, an upper bound on what answering blindly can score;
- `centred_box` (grounding): a box centred in the image with the mean size of the
  source's training boxes;
- `nearest_caption` (captioning): the caption of the nearest training image by 8 x 8
  colour thumbnail, no learned features at all.

Each takes the rows of one evaluation file and returns one answer string per row, so the
baselines are scored by the same metric code as the model.

A version is approved for a task only where it beats the task's trivial baseline
(`approved_tasks`): the registry records the approval on the version, promotion needs one
approved task, the server warns on (or refuses) questions of the others.
"""
from __future__ import annotations

# imports inside functions: predictors brings torch: not loaded where only the approval is read
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..formats.benchmarks import EVAL_KEYS, PRIMARY, TASK_OF, TASKS, ci_bounds, delta_metric
from ..formats.boxes import box_text, parse_boxes
from .intervals import verdict

BASELINES = ("untuned", "majority_answer", "centred_box", "nearest_caption")
# which trivial baseline applies to which task (the untuned model answers everything)
TRIVIAL = {"vqa": "majority_answer", "grounding": "centred_box", "caption": "nearest_caption"}


def trivial_verdicts(metrics: dict[str, float]) -> dict[str, dict[str, str]]:
    """Per task, per scored bench split: what the paired interval of the primary metric's
    difference to the task's trivial baseline says (`intervals.verdict`: better, no
    significant difference, worse), "not evaluated" where the evaluation run holds none."""
    out: dict[str, dict[str, str]] = {task: {} for task in TASKS}
    for key in EVAL_KEYS:
        task = TASK_OF[key]
        low, high = (metrics.get(b) for b in ci_bounds(delta_metric(key, PRIMARY[task], TRIVIAL[task])))
        out[task][key] = "not evaluated" if low is None or high is None else verdict(low, high)
    return out


def approved_tasks(metrics: dict[str, float]) -> list[str]:
    """The tasks an evaluation run approves: those whose primary metric is significantly above
    the task's trivial baseline (the whole paired interval of the difference above 0) on every
    scored split of the task. A split left out or scored without the baseline approves nothing."""
    return [task for task, splits in trivial_verdicts(metrics).items()
            if all(v == "better" for v in splits.values())]


def majority_answers(rows: list[dict]) -> list[str]:
    """Each question type's most frequent answer, counted on the test file itself: an
    upper bound on what answering blindly can score, so beating it means something."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_type[r["question_type"]][r["answer"]] += 1
    return [by_type[r["question_type"]].most_common(1)[0][0] for r in rows]


def centred_boxes(rows: list[dict], train: list, source: str) -> list[str]:
    """A box centred in the image with the mean size of the source's training boxes
    (`train`: stage-1 instruction items; a 30 x 30 grid-unit box when the source has none)."""
    sizes = [(b[2] - b[0], b[3] - b[1]) for it in train if it.source == source and it.task == "refer"
             for b in parse_boxes(it.turns[0][1])[:1]]
    w, h = (float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))) if sizes else (30.0, 30.0)
    out = []
    for r in rows:
        iw, ih = r["image_size"]
        x1, y1 = (100 - w) / 2 / 100 * iw, (100 - h) / 2 / 100 * ih
        out.append(box_text((x1, y1, x1 + w / 100 * iw, y1 + h / 100 * ih), iw, ih))
    return out


def _thumb(path: Path, frames: int) -> np.ndarray:
    """An 8x8 colour thumbnail: what a 'nearest image' can know without learning."""
    from .predictors import load_frames  # torch: not loaded where only the approval is read
    im = load_frames(path, frames)[0]
    return np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255


def nearest_captions(rows: list[dict], eval_root: Path, train: list, train_root: Path, source: str) -> list[str]:
    """The caption of the nearest training image (8x8 thumbnails, L2): the classic
    nearest-neighbour captioning baseline, here with no learned features at all. It
    returns the caption the model is trained to give for that image (stage 1's answer to
    the captioning prompt: the image's most consensual reference), so both answer alike."""
    from .predictors import media_of
    caps: dict[tuple[str, int], str] = {}
    for it in train:
        if it.source == source and it.task in ("caption", "video_caption") and (it.media, it.frames) not in caps:
            caps[(it.media, it.frames)] = it.turns[0][1]
    if not caps:
        return [""] * len(rows)
    keys = list(caps)
    bank = np.stack([_thumb(train_root / m, f) for m, f in keys])
    out = []
    for r in rows:
        m, f = media_of(r)
        d = ((bank - _thumb(eval_root / m, f)) ** 2).sum(1)
        out.append(caps[keys[int(d.argmin())]])
    return out


def trivial_answers(task: str, rows: list[dict], eval_root: Path, train: list, train_root: Path,
                    source: str) -> tuple[str, list[str]]:
    """(name, answers) of the task's trivial baseline for these rows of `source`'s eval file
    (media paths relative to `eval_root`); `train` holds the stage-1 items under `train_root`."""
    name = TRIVIAL[task]
    if task == "vqa":
        return name, majority_answers(rows)
    if task == "grounding":
        return name, centred_boxes(rows, train, source)
    return name, nearest_captions(rows, eval_root, train, train_root, source)
