"""Reader for CapERA (UAV event clips with five captions each), as its authors released it.

The release (GitHub yakoubbazi/CapEra, `dataset/`) is one JSON file per split, no split
field (the file is the split) and no val file:

    CapERA_DATASET_train.json  (1,473 videos)   CapERA_DATASET_test.json  (1,391 videos)
    {"ERA_caption": [{"video_id": "Baseball_001.mp4",
                      "annotation": {"English_caption": [5 captions]}}, ...]}

The videos are the ERA data set's MP4s, which keep train and test apart (a folder per event
inside each): they are looked for under `<root>/<split>/` at any depth (the split folder's
name in any case: `train`, `Train`), or under `<media>/<split>/` when the user names
the video folder. ERA numbers its train and test videos separately, so `Baseball_001.mp4`
of train and of test are different videos: a clip is (split, video_id), never the id alone.
The event class is everything before the trailing `_NNN` (`TrafficCongestion_012.mp4` ->
`TrafficCongestion`). A missing video is counted and named in the ReadReport, not fatal.

Also read: SkyEye-Synth's own earlier layout (`captions.json`), which the data versions
committed in data.dvc up to e004391 (DVC 038d42f4) hold; a model trained on one of them
re-reads it when it is rebuilt or its backbones are retrained.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..formats.benchmarks import SPLITS
from .records import CaptionSample, DataFormatError, ReadReport, read_json, require

RELEASE_FILES = {"train": "CapERA_DATASET_train.json", "test": "CapERA_DATASET_test.json"}
LEGACY_FILE = "captions.json"  # SkyEye-Synth's layout until data version 038d42f4
_VIDEO_ID = re.compile(r"(?P<event>.+)_(?P<number>\d+)\.mp4")


def is_capera(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (*RELEASE_FILES.values(), LEGACY_FILE))


def event_words(event: str) -> str:
    """An event class as words for an answer: `TrafficCongestion` -> `traffic congestion`,
    `NonEvent` -> `non-event`; the earlier synthetic `traffic_congestion` alike."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", event).replace("_", " ").lower()
    return re.sub(r"^non ", "non-", words)


def read_capera(benchmark: str, root: Path, splits: Sequence[str] | None = None,
                media: Path | None = None) -> tuple[list[CaptionSample], ReadReport]:
    """The released layout when its files are there, else SkyEye-Synth's earlier one."""
    if any((root / f).is_file() for f in RELEASE_FILES.values()):
        return _read_release(benchmark, root, splits, Path(media) if media else root)
    if (root / LEGACY_FILE).is_file():
        if media is not None:
            raise ValueError(f"{root}: the {LEGACY_FILE} layout names its clips' files; a video folder does not apply")
        return _read_legacy(benchmark, root, splits)
    raise DataFormatError(root, f"{' / '.join(RELEASE_FILES.values())}", "no CapERA annotation file in this folder")


def _read_release(benchmark: str, root: Path, splits: Sequence[str] | None,
                  media: Path) -> tuple[list[CaptionSample], ReadReport]:
    """Samples ordered by split (as asked), then in file order."""
    wanted = tuple(splits) if splits is not None else tuple(s for s, f in RELEASE_FILES.items() if (root / f).is_file())
    for split in wanted:
        if split not in RELEASE_FILES or not (root / RELEASE_FILES[split]).is_file():
            # no val file in the release: the builder holds part of train out instead
            raise FileNotFoundError(f"{root / RELEASE_FILES.get(split, f'CapERA_DATASET_{split}.json')}: "
                                    f"CapERA has no {split} split file here")
    report = ReadReport(benchmark)
    samples: list[CaptionSample] = []
    for split in wanted:
        path = root / RELEASE_FILES[split]
        entries = require(read_json(path), "ERA_caption", path, kind=list)
        videos = _video_index(media, split)
        seen: set[str] = set()
        kept = 0
        for i, entry in enumerate(entries):
            where = f"ERA_caption[{i}]"
            video_id = require(entry, "video_id", path, where, str)
            annotation = require(entry, "annotation", path, where, dict)
            captions = require(annotation, "English_caption", path, f"{where}.annotation", list)
            match = _VIDEO_ID.fullmatch(video_id)
            if match is None:
                raise DataFormatError(path, f"{where}.video_id", f"expected <Event>_<NNN>.mp4, got {video_id!r}")
            if video_id in seen:  # unique within its split file (not across the two)
                raise DataFormatError(path, f"{where}.video_id", f"duplicate video_id {video_id!r}")
            seen.add(video_id)
            if not all(isinstance(c, str) for c in captions):
                raise DataFormatError(path, f"{where}.annotation.English_caption", "expected a list of strings")
            texts = tuple(c.strip() for c in captions if c.strip())
            if len(texts) < len(captions):
                report.skip("empty caption", len(captions) - len(texts), split=split)
            if not texts:
                report.skip("clip without captions", example=f"{path.name} {where}", split=split)
                continue
            video = videos.get(video_id)
            if video is None:
                report.skip("missing video file", example=f"{split}/{video_id} ({path.name} {where})", split=split)
                continue
            samples.append(CaptionSample(benchmark, split, video_id.removesuffix(".mp4"), video, captions=texts,
                                         scene_class=match["event"], is_video=True))
            kept += 1
        report.kept[split] += kept
    return samples, report


def _video_index(base: Path, split: str) -> dict[str, Path]:
    """File name -> path of every MP4 under `<base>/<split>/` at any depth; a name found twice
    in one split is ambiguous and refused, naming both files."""
    index: dict[str, Path] = {}
    folders = sorted(d for d in base.iterdir() if d.is_dir() and d.name.lower() == split) if base.is_dir() else []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() != ".mp4" or not path.is_file():
                continue
            if path.name in index:
                raise DataFormatError(path, "file name", f"{path.name} is also at {index[path.name]}: "
                                      f"which video is the {split} clip is ambiguous")
            index[path.name] = path
    return index


def _read_legacy(benchmark: str, root: Path,
                 splits: Sequence[str] | None) -> tuple[list[CaptionSample], ReadReport]:
    """SkyEye-Synth's earlier layout: `captions.json` = {"dataset": "capera", "clips": [{"id",
    "file": "clips/<id>.mp4", "event", "split" (train/val/test), "captions": [5]}]}."""
    path = root / LEGACY_FILE
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
            report.skip("empty caption", len(captions) - len(texts), split=split)
        if not texts:
            report.skip("clip without captions", split=split)
            continue
        video = root / file
        if not video.is_file():
            report.skip("missing video file", example=f"{file} ({where})", split=split)
            continue
        by_split[split].append(
            CaptionSample(benchmark, split, clip_id, video, captions=texts, scene_class=event, is_video=True))
    samples: list[CaptionSample] = []
    for split in wanted:
        samples.extend(by_split[split])
        report.kept[split] += len(by_split[split])
    return samples, report
