"""SkyEyeGPT answering the benchmark prompts: batched greedy generation with a KV cache,
the frozen encoder's output cached per media file. It takes the rows of one evaluation
file (media paths relative to the file's folder) and returns one answer string per row,
as the baselines (`baselines`) do, so all are scored by the same metric code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..synth.video import read_frames


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
            for k, chunk in zip(missing, torch.split(out, [k[1] for k in missing]), strict=True):
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
