"""Reader for the Karpathy-style caption JSONs: UCM-Captions, Sydney-Captions, RSICD.

One JSON per benchmark (`dataset.json` or `dataset_rsicd.json`) lists every image with
its split and five sentences; images sit in `imgs/` or `RSICD_images/`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..formats.benchmarks import SPLITS
from .records import CaptionSample, DataFormatError, ReadReport, read_json, require

# benchmark -> (annotation file, image folder)
LAYOUTS: dict[str, tuple[str, str]] = {
    "ucm_captions": ("dataset.json", "imgs"),
    "sydney_captions": ("dataset.json", "imgs"),
    "rsicd": ("dataset_rsicd.json", "RSICD_images"),
}

_NUMBERED = re.compile(r"^(.+)_\d+$")


def rsicd_scene_class(filename: str) -> str | None:
    """`denseresidential_12.jpg` -> `denseresidential`; None for names without a class prefix."""
    match = _NUMBERED.match(Path(filename).stem)
    return match.group(1) if match else None


def caption_text(sentence: object, path: Path, where: str) -> str:
    """The `raw` caption stripped, or the tokens joined when raw is absent or empty."""
    if not isinstance(sentence, dict):
        raise DataFormatError(path, where, "expected a sentence object")
    raw = sentence.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise DataFormatError(path, f"{where}.raw", f"expected str, got {type(raw).__name__}")
    if raw and raw.strip():
        return raw.strip()
    if "tokens" not in sentence and raw is None:
        raise DataFormatError(path, f"{where}.raw", "missing (and no tokens to fall back to)")
    tokens = sentence.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataFormatError(path, f"{where}.tokens", "expected a list of strings")
    return " ".join(tokens).strip()


def read_karpathy(
    benchmark: str, root: Path, splits: Sequence[str] | None = None
) -> tuple[list[CaptionSample], ReadReport]:
    """Read one Karpathy JSON; samples ordered by split (as asked), then by imgid."""
    ann_name, img_dir = LAYOUTS[benchmark]
    path = root / ann_name
    doc = read_json(path)
    images = require(doc, "images", path, kind=list)
    wanted = tuple(splits) if splits is not None else SPLITS[benchmark]
    report = ReadReport(benchmark)
    by_split: dict[str, list[tuple[int, CaptionSample]]] = {s: [] for s in wanted}
    seen: set[int] = set()
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        filename = require(entry, "filename", path, where, str)
        imgid = require(entry, "imgid", path, where, int)
        split = require(entry, "split", path, where, str)
        sentences = require(entry, "sentences", path, where, list)
        if split not in SPLITS[benchmark]:
            raise DataFormatError(path, f"{where}.split", f"unknown split {split!r}")
        if imgid in seen:
            raise DataFormatError(path, f"{where}.imgid", f"duplicate imgid {imgid}")
        seen.add(imgid)
        if split not in by_split:
            continue
        captions = tuple(
            text for j, s in enumerate(sentences) if (text := caption_text(s, path, f"{where}.sentences[{j}]"))
        )
        if len(captions) < len(sentences):
            report.skip("empty caption", len(sentences) - len(captions), split=split)
        if not captions:
            report.skip("image without captions", split=split)
            continue
        image = root / img_dir / filename
        if not image.is_file():
            report.skip("missing image file", split=split)
            continue
        scene = rsicd_scene_class(filename) if benchmark == "rsicd" else None
        sample = CaptionSample(benchmark, split, str(imgid), image, captions=captions, scene_class=scene)
        by_split[split].append((imgid, sample))
    samples: list[CaptionSample] = []
    for split in wanted:
        rows = sorted(by_split[split], key=lambda r: r[0])
        samples.extend(s for _, s in rows)
        report.kept[split] += len(rows)
    return samples, report
