"""The drift monitor's reference: what the served version was trained on, as a `drift.Sample`.

The served version's lineage names its data version (`skyeye.data.dvc_md5`); the monitor flow
hands in a reader of that version's files (the local `data/`, or DVC at the commit that holds
it: flows/monitor.py, so that this package needs nothing of the data gate). From the
instruction files (stage 1 and stage 2): the task identifier and length of a sample of the
questions, and the size and frozen-encoder signature of a sample of the images. Signatures
cost a forward pass each, so the reference is cached per (data version, encoder) under
`<state>/monitor/`.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..config import get_settings
from ..formats.prompts import IMAGE_PLACEHOLDER
from .config import MonitorConfig
from .drift import Sample, image_side, task_identifier
from .signals import image_signature

INSTRUCTIONS = "data/instructions"  # relative to the project root, as data.dvc tracks it
STAGE_FILES = ("stage1.json", "stage2.json")


class ReferenceError(RuntimeError):
    """The served version's training data cannot be read; the message names the version."""


Opener = Callable[[str], bytes]  # a path relative to the project root -> the file's bytes


def encoder_key(model) -> str:
    """A digest of the frozen vision encoder's weights: the signatures' space."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.vision.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def questions(records: list[dict]) -> list[tuple[str, str | None]]:
    """(question text, image path relative to the instructions folder) of every human turn."""
    out = []
    for r in records:
        for turn in r.get("conversations", []):
            if turn.get("from") == "human":
                out.append((turn["value"].replace(IMAGE_PLACEHOLDER, "").strip(), r.get("image")))
    return out


def build_reference(read: Opener, model, cfg: MonitorConfig) -> Sample:
    """Task identifiers and lengths of a sample of the training questions; sizes and signatures of
    a sample of the training images (`cfg.reference_prompts`, `cfg.reference_images`)."""
    turns: list[tuple[str, str | None]] = []
    for name in STAGE_FILES:
        rel = f"{INSTRUCTIONS}/{name}"
        try:
            turns += questions(json.loads(read(rel)))
        except FileNotFoundError:
            continue  # a data version without stage 2
        except (ValueError, TypeError, KeyError) as err:
            raise ReferenceError(f"{rel}: not an instruction file ({err})") from None
    if not turns:
        raise ReferenceError(f"no questions in {INSTRUCTIONS}/{{{','.join(STAGE_FILES)}}}")
    rng = np.random.default_rng(cfg.seed)
    picked = [turns[i] for i in sorted(rng.choice(len(turns), min(len(turns), cfg.reference_prompts), replace=False))]
    # distinct images, as the window counts them (`drift.window_of`)
    paths = sorted({p for _, p in turns if p})
    paths = [paths[i] for i in sorted(rng.choice(len(paths), min(len(paths), cfg.reference_images), replace=False))]
    images = []
    for p in paths:
        rel = posixpath.normpath(posixpath.join(INSTRUCTIONS, p))
        try:
            images.append(Image.open(io.BytesIO(read(rel))).convert("RGB"))
        except (OSError, ValueError) as err:
            raise ReferenceError(f"{rel}: unreadable training image ({err})") from None
    return Sample([task_identifier(q) for q, _ in picked], [len(q) for q, _ in picked],
                  image_side([im.width for im in images], [im.height for im in images]),
                  image_signature(model, images))


def cached_reference(md5: str, model, cfg: MonitorConfig, open_version: Callable[[], tuple[Opener, str]]
                     ) -> tuple[Sample, str]:
    """The reference of data version `md5` under `model`'s encoder, from the cache or built from
    the files `open_version()` reads (and cached); and where it came from."""
    key = f"{md5}-{encoder_key(model)}-{cfg.reference_prompts}-{cfg.reference_images}-{cfg.seed}"
    path = get_settings().state / "monitor" / f"reference-{key}.npz"
    if path.exists():
        with np.load(path) as arrays:
            return Sample.from_arrays(arrays), f"cached {path}"
    read, where = open_version()
    sample = build_reference(read, model, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **sample.to_arrays())
    tmp.replace(path)
    return sample, where
