"""The 8 benchmark readers behind one entry point, and layout detection (the benchmarks' names
and splits live in `skyeye.formats.benchmarks`).

`read_benchmark(name, root)` reads a benchmark folder in its native layout (a real
download or SkyEye-Synth) into typed records plus a ReadReport of what was left out.
CapERA and RSVG are read as their authors released them; their SkyEye-Synth layouts of
data versions up to 038d42f4 (CapERA `captions.json`, RSVG as VOC XML) are still read, so
those versions rebuild and retrain (docs/data.md).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..formats.benchmarks import BENCHMARKS, SPLITS
from .capera import is_capera, read_capera
from .captions import read_karpathy
from .records import ReadReport, Sample, read_json
from .rsvg import is_rsvg_release, read_rsvg
from .rsvqa import read_rsvqa
from .voc import VOC_SPLITS, read_voc

LEGACY_RSVG_FOLDER = "rsvg"  # SkyEye-Synth's VOC-layout RSVG folder, data versions up to 038d42f4


def _read_rsvg_any(name: str, root: Path, splits: Sequence[str] | None) -> tuple[list, ReadReport]:
    """The released `.pth` layout when present, else the VOC layout SkyEye-Synth used to write."""
    return (read_rsvg if is_rsvg_release(root) else read_voc)(name, root, splits)


Reader = Callable[[str, Path, Sequence[str] | None], tuple[list, ReadReport]]
_READERS: dict[str, Reader] = {
    "ucm_captions": read_karpathy,
    "sydney_captions": read_karpathy,
    "rsicd": read_karpathy,
    "capera": read_capera,
    "rsvqa_lr": read_rsvqa,
    "rsvqa_hr": read_rsvqa,
    "rsvg": _read_rsvg_any,
    "dior_rsvg": read_voc,
}


def read_benchmark(
    name: str, root: Path, splits: Iterable[str] | None = None, media: Path | None = None
) -> tuple[list[Sample], ReadReport]:
    """Read benchmark `name` from folder `root`; `splits=None` reads every split present.

    `media`: CapERA only, the folder holding ERA's videos (`<media>/<split>/...`) when they
    are not under `root`. Image paths in the samples are absolute; the order is deterministic.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    wanted: tuple[str, ...] | None = None
    if splits is not None:
        wanted = tuple(dict.fromkeys([splits] if isinstance(splits, str) else splits))  # dedupe, keep order
        unknown = [s for s in wanted if s not in SPLITS[name]]
        if unknown:
            raise ValueError(f"{name} has no split(s) {unknown}; its splits: {', '.join(SPLITS[name])}")
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: benchmark folder not found")
    if media is not None:
        if name != "capera":
            raise ValueError(f"{name}: a media folder applies to CapERA only (its videos ship apart from the captions)")
        if not Path(media).is_dir():
            raise FileNotFoundError(f"{media}: video folder not found")
        return read_capera(name, root, wanted, Path(media).resolve())
    return _READERS[name](name, root, wanted)


def detect_benchmark(folder: Path) -> str | None:
    """Which of the 8 layouts `folder` holds, from its marker files; None if none matches."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    folder_name = folder.resolve().name.lower()
    if (folder / "dataset_rsicd.json").is_file():
        return "rsicd"
    if (folder / "dataset.json").is_file():
        # UCM and Sydney share the file name: tell them by the "dataset" value, else the folder name
        for hint in (_dataset_value(folder / "dataset.json"), folder_name):
            for key, name in (("ucm", "ucm_captions"), ("sydney", "sydney_captions"), ("rsicd", "rsicd")):
                if key in hint:
                    return name
        return None
    if is_capera(folder):
        return "capera"
    if is_rsvg_release(folder):
        return "rsvg"
    if any(folder.glob("LR_split_*.json")):
        return "rsvqa_lr"
    if any(folder.glob("USGS_split_*.json")):
        return "rsvqa_hr"
    if (folder / "Annotations").is_dir() and any((folder / f"{s}.txt").is_file() for s in VOC_SPLITS):
        # DIOR-RSVG's layout; SkyEye-Synth wrote RSVG so too, in a folder named `rsvg`, until 038d42f4
        return "rsvg" if folder_name == LEGACY_RSVG_FOLDER else "dior_rsvg"
    return None


def _dataset_value(path: Path) -> str:
    """The lower-cased "dataset" value of a Karpathy JSON, or "" if unreadable."""
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return ""
    value = doc.get("dataset") if isinstance(doc, dict) else None
    return value.lower() if isinstance(value, str) else ""
