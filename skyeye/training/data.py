"""Training data for the stages: the instruction samples' pixels, per-source sampling (the
samples themselves are `skyeye.data.items`).

Images are decoded and resized once and kept as uint8 (the demo corpus is ~3,300
images of 128 px: ~160 MB); clips enter as a few evenly spaced frames. Batches are
drawn by per-source sampling ratios (the stage config), then uniformly within a source.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.items import Item
from ..synth.video import read_frames


class PixelCache:
    """uint8 (3, S, S) per image (or (F, 3, S, S) per clip), decoded once."""

    def __init__(self, root: Path, side: int):
        self.root, self.side = Path(root), side
        self._store: dict[tuple[str, int], torch.Tensor] = {}

    def _resize(self, im: Image.Image) -> np.ndarray:
        return np.array(im.convert("RGB").resize((self.side, self.side), Image.BICUBIC), dtype=np.uint8)

    def get(self, media: str, frames: int = 1) -> torch.Tensor:
        key = (media, frames)
        if key not in self._store:
            path = self.root / media
            if frames > 1:
                arr = np.stack([self._resize(f) for f in read_frames(path, frames)])
                self._store[key] = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
            else:
                with Image.open(path) as im:
                    self._store[key] = torch.from_numpy(self._resize(im)).permute(2, 0, 1).contiguous()
        return self._store[key]


def normalise(pixels_u8: torch.Tensor, mean, std) -> torch.Tensor:
    x = pixels_u8.float() / 255
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class SourceSampler:
    """Draws item indices: a source by its ratio, then an item of that source uniformly.
    An empty `ratios` draws by size. Otherwise every source with samples must be named (0
    leaves one out): a source added to the data (a LLaVA set) is never silently untrained
    while its name and licence reach the model's lineage."""

    def __init__(self, items: list[Item], ratios: dict[str, float], seed: int, rank: int = 0):
        self.by_source: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            self.by_source.setdefault(it.source, []).append(i)
        unknown = {s for s, r in ratios.items() if r > 0} - set(self.by_source)
        if unknown:
            raise ValueError(f"sampling ratios name sources with no samples: {sorted(unknown)} "
                             f"(have: {sorted(self.by_source)})")
        unnamed = set(self.by_source) - set(ratios) if ratios else set()
        if unnamed:
            raise ValueError(f"the data has sources the sampling ratios do not name: {sorted(unnamed)}; give each "
                             "a share in the stage config's sampling (0 leaves it out)")
        self.sources = sorted(self.by_source)
        w = np.array([ratios.get(s, 0.0) if ratios else len(self.by_source[s]) for s in self.sources], dtype=float)
        if w.sum() <= 0:
            raise ValueError("sampling ratios are all zero")
        self.weights = w / w.sum()
        self.rng = np.random.default_rng([seed, rank])  # each DDP rank draws its own stream

    def draw(self, n: int) -> list[int]:
        src = self.rng.choice(len(self.sources), size=n, p=self.weights)
        return [self.by_source[self.sources[k]][int(self.rng.integers(len(self.by_source[self.sources[k]])))]
                for k in src]
