"""Reader for CapERA (UAV event clips with five captions each), in SkyEye's own layout.

The public CapERA release's file layout was not available to us, so SkyEye defines its
own (clips as MP4, as released, plus one JSON):

    captions.json  {"dataset": "capera",
                    "clips": [{"id", "file": "clips/<id>.mp4", "event", "split",
                               "captions": [5 strings]}]}
    clips/<id>.mp4
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..formats.benchmarks import SPLITS
from .records import CaptionSample, DataFormatError, ReadReport, read_json, require

ANNOTATION_FILE = "captions.json"


def read_capera(
    benchmark: str, root: Path, splits: Sequence[str] | None = None
) -> tuple[list[CaptionSample], ReadReport]:
    """Read `captions.json`; samples ordered by split (as asked), then in file order."""
    path = root / ANNOTATION_FILE
    clips = require(read_json(path), "clips", path, kind=list)
    wanted = tuple(splits) if splits is not None else SPLITS[benchmark]
    report = ReadReport(benchmark)
    by_split: dict[str, list[CaptionSample]] = {s: [] for s in wanted}
    seen: set[str] = set()
    for i, entry in enumerate(clips):
        where = f"clips[{i}]"
        clip_id = str(require(entry, "id", path, where, (str, int)))
        file = require(entry, "file", path, where, str)
        event = require(entry, "event", path, where, str)
        split = require(entry, "split", path, where, str)
        captions = require(entry, "captions", path, where, list)
        if split not in SPLITS[benchmark]:
            raise DataFormatError(path, f"{where}.split", f"unknown split {split!r}")
        if clip_id in seen:
            raise DataFormatError(path, f"{where}.id", f"duplicate clip id {clip_id!r}")
        seen.add(clip_id)
        if not all(isinstance(c, str) for c in captions):
            raise DataFormatError(path, f"{where}.captions", "expected a list of strings")
        if split not in by_split:
            continue
        texts = tuple(c.strip() for c in captions if c.strip())
        if len(texts) < len(captions):
            report.skip("empty caption", len(captions) - len(texts))
        if not texts:
            report.skip("clip without captions")
            continue
        video = root / file
        if not video.is_file():
            report.skip("missing video file")
            continue
        by_split[split].append(
            CaptionSample(benchmark, split, clip_id, video, captions=texts, scene_class=event, is_video=True)
        )
    samples: list[CaptionSample] = []
    for split in wanted:
        samples.extend(by_split[split])
        report.kept[split] += len(by_split[split])
    return samples, report
