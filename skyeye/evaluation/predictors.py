"""Who answers the benchmark prompts: SkyEyeGPT (batched greedy generation with a KV
cache) and the trivial baselines that give every score its context.

Every predictor takes the rows of one evaluation file (media paths relative to the
file's folder) and returns one answer string per row, so all of them are scored by the
same metric code.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..boxes import box_text, parse_boxes
from ..synth.video import read_frames
from ..training.data import Item


def media_of(row: dict) -> tuple[str, int]:
    """(relative media path, frames): a clip enters as a few sampled frames."""
    if "video" in row:
        return row["video"], int(row.get("frames", 1))
    return row["image"], 1


def load_frames(path: Path, frames: int) -> list[Image.Image]:
    if frames > 1 or path.suffix.lower() == ".mp4":
        return read_frames(path, max(frames, 1))
    with Image.open(path) as im:
        return [im.convert("RGB")]


class ModelPredictor:
    """SkyEyeGPT answering batches of prompts. The frozen encoder's output is cached per
    media file, so the model and its untuned baseline (same encoder) encode each image once."""

    def __init__(self, model, name: str = "skyeyegpt", batch_size: int = 32, encoder_cache: dict | None = None):
        self.model, self.name, self.batch_size = model.eval(), name, batch_size
        self.cache = {} if encoder_cache is None else encoder_cache

    def _vision_tokens(self, root: Path, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, list[int]]:
        missing = [k for k in dict.fromkeys(keys) if (str(root / k[0]), k[1]) not in self.cache]
        if missing:
            images = [im for k in missing for im in load_frames(root / k[0], k[1])]
            with torch.no_grad():
                out = self.model.vision(self.model.preprocess(images).to(self.model.device))
            for k, chunk in zip(missing, torch.split(out, [k[1] for k in missing])):
                self.cache[(str(root / k[0]), k[1])] = chunk
        tokens = torch.cat([self.cache[(str(root / k[0]), k[1])] for k in keys])
        return tokens, [k[1] for k in keys]

    def answer(self, root: Path, rows: list[dict], prompts: list[str], max_new_tokens: int,
               progress=None) -> list[str]:
        out: list[str] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            vis, frames = self._vision_tokens(root, [media_of(r) for r in chunk])
            out += self.model.ask(prompts[i:i + self.batch_size], frames, vision_tokens=vis,
                                  max_new_tokens=max_new_tokens)
            if progress is not None:
                progress.update(len(chunk))
        return out


# ---------------------------------------------------------------- trivial baselines
def majority_answers(rows: list[dict]) -> list[str]:
    """Each question type's most frequent answer, counted on the test file itself: an
    upper bound on what answering blindly can score, so beating it means something."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_type[r["question_type"]][r["answer"]] += 1
    return [by_type[r["question_type"]].most_common(1)[0][0] for r in rows]


def centred_boxes(rows: list[dict], train: list[Item], source: str) -> list[str]:
    """A box centred in the image with the mean size of the source's training boxes."""
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
    im = load_frames(path, frames)[0]
    return np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255


def nearest_captions(rows: list[dict], eval_root: Path, train: list[Item], train_root: Path,
                     source: str) -> list[str]:
    """The caption of the nearest training image (8x8 thumbnails, L2): the classic
    nearest-neighbour captioning baseline, here with no learned features at all. It
    returns the caption the model is trained to give for that image (stage 1's answer to
    the captioning prompt: the image's most consensual reference), so both answer alike."""
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
