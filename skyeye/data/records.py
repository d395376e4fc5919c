"""The one typed record model every benchmark reader produces.

Readers in `skyeye.data.readers` turn each of the 8 benchmarks' native layouts (real
downloads or SkyEye-Synth) into these records; the instruction builder and the
evaluation read nothing else. Boxes are in pixels of the source image, (x1, y1, x2, y2).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Split = str  # "train" | "val" | "test" | "test_phili" (RSVQA-HR test set 2)
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    benchmark: str  # e.g. "ucm_captions", "rsvqa_lr", "dior_rsvg"
    split: Split
    id: str  # unique within (benchmark, split)
    image: Path  # image file, or the video file for CapERA


@dataclass(frozen=True)
class CaptionSample(Sample):
    captions: tuple[str, ...]  # all reference captions (5 in every published set)
    scene_class: str | None = None  # land-use class when the layout carries one
    is_video: bool = False
    task: Literal["caption"] = "caption"


@dataclass(frozen=True)
class VQASample(Sample):
    question: str
    answer: str
    question_type: str  # native type: presence, comp, rural_urban, count, area
    task: Literal["vqa"] = "vqa"


@dataclass(frozen=True)
class GroundingSample(Sample):
    expression: str  # the referring expression
    box: Box  # pixels
    image_size: tuple[int, int]  # (width, height)
    category: str = ""
    task: Literal["grounding"] = "grounding"


@dataclass
class ReadReport:
    """What a reader kept and what it left out, and why: rows are never dropped silently."""

    benchmark: str
    kept: Counter = field(default_factory=Counter)  # split -> samples
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def summary(self) -> str:
        kept = ", ".join(f"{s}={n}" for s, n in sorted(self.kept.items())) or "nothing"
        text = f"{self.benchmark}: kept {kept}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return text


class DataFormatError(ValueError):
    """A native file that does not follow its layout; the message names file and field."""

    def __init__(self, path: Path | str, field_name: str, problem: str):
        self.path, self.field = Path(path), field_name
        super().__init__(f"{path}: field '{field_name}': {problem}")


def read_json(path: Path) -> Any:
    """Load a native JSON file; bad JSON becomes a DataFormatError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(path, "(whole file)", f"not valid JSON: {e}") from e


def require(entry: Any, key: str, path: Path, where: str = "", kind: type | tuple[type, ...] = object) -> Any:
    """entry[key], checked for presence and type; `where` locates the entry in the file."""
    name = f"{where}.{key}" if where else key
    if not isinstance(entry, dict):
        raise DataFormatError(path, where or "(top level)", f"expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataFormatError(path, name, "missing")
    value, kinds = entry[key], _as_tuple(kind)
    # bool is an int subclass; an id that is true/false is a format error, not id 1/0
    if not isinstance(value, kinds) or (isinstance(value, bool) and int in kinds and bool not in kinds):
        want = " or ".join(t.__name__ for t in kinds)
        raise DataFormatError(path, name, f"expected {want}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
