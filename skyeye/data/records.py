"""The one typed record model every benchmark reader produces.

Readers in `skyeye.data.readers` turn each of the 8 benchmarks' native layouts (real
downloads or SkyEye-Synth) into these records; the instruction builder and the
evaluation read nothing else. Boxes are in pixels of the source image, (x1, y1, x2, y2),
and inside it: `fit_box` is the one policy for an annotation box that leaves its image.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Split = str  # "train" | "val" | "test" | "test_phili" (RSVQA-HR test set 2)
Box = tuple[float, float, float, float]

# ---- annotation boxes against their image (the policy; `fit_box` applies it) ----
# How far a box edge may lie outside the image and still be taken for a rounding or
# off-by-one slip of the annotation (0- vs 1-based pixels, a drag past the edge in the
# labelling tool): the larger of 1 px and 1% of the image side. 1% is one cell of the
# 0-100 grid the builder writes boxes on, so clipping such a box to the edge moves its
# box text by at most one cell, no more than the grid's own truncation. Further out,
# the annotation does not say where the object is (a DIOR XML with xmax five times
# the width): the object is skipped, not trained on and not scored.
EDGE_TOLERANCE_PX = 1.0
EDGE_TOLERANCE_FRACTION = 0.01
BOX_OUTSIDE = "box outside the image"  # skip reason: beyond the tolerance (or no area left inside)
BOX_CLIPPED = "box edge just outside the image"  # clip reason: within the tolerance, clipped to the edge
BOX_POLICY = (f"A box edge outside its image by at most max({EDGE_TOLERANCE_PX:g} px, "
              f"{EDGE_TOLERANCE_FRACTION:.0%} of the image side) is clipped to the edge and counted as "
              f"'{BOX_CLIPPED}'; a box further out is a defect: its object is skipped (neither trained "
              f"on nor scored) and counted as '{BOX_OUTSIDE}', with examples naming file and field.")
MAX_EXAMPLES = 3  # offending rows a report keeps per reason (file and field), for the data card


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


@dataclass(frozen=True)
class BoxFit:
    """What `fit_box` made of an annotation box."""

    status: Literal["inside", "clipped", "outside"]
    box: Box | None  # the box to use (as given, or clipped to the image); None when outside
    detail: str = ""  # the offending fields, e.g. "xmax=4000 > width=800"


def fit_box(box: Box, size: tuple[int, int]) -> BoxFit:
    """Check a pixel box (x1, y1, x2, y2) against its image of `size` (width, height).

    Inside is 0 <= x1, x2 <= width (and so for y): VOC's 1-based xmax may equal the width.
    An edge outside by at most the tolerance (`EDGE_TOLERANCE_PX`, `EDGE_TOLERANCE_FRACTION`
    of that side) is clipped to the image ("clipped"); further out, or with no area left
    inside once clipped, the box is "outside" and its object is to be skipped. `detail`
    names each offending field with its value and the bound it breaks.
    """
    width, height = size
    tol_x = max(EDGE_TOLERANCE_PX, EDGE_TOLERANCE_FRACTION * width)
    tol_y = max(EDGE_TOLERANCE_PX, EDGE_TOLERANCE_FRACTION * height)
    x1, y1, x2, y2 = box
    over: list[str] = []
    beyond = False
    for name, value, side, bound, tol in (("xmin", x1, "width", width, tol_x), ("ymin", y1, "height", height, tol_y),
                                         ("xmax", x2, "width", width, tol_x), ("ymax", y2, "height", height, tol_y)):
        if value < 0:
            over.append(f"{name}={value:g} < 0")
            beyond |= value < -tol
        elif value > bound:
            over.append(f"{name}={value:g} > {side}={bound}")
            beyond |= value > bound + tol
    if not over:
        return BoxFit("inside", box)
    detail = ", ".join(over)
    if beyond:
        return BoxFit("outside", None, detail)
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        return BoxFit("outside", None, f"{detail}: no area inside the image")
    return BoxFit("clipped", clipped, detail)


@dataclass
class ReadReport:
    """What a reader kept and what it left out, and why: rows are never dropped silently.

    `clipped` counts rows kept after a repair (a box clipped to its image, `fit_box`);
    `examples` keeps the first few offending rows of a reason (file and field) for the
    reasons a reader gives them for.
    """

    benchmark: str
    kept: Counter = field(default_factory=Counter)  # split -> samples
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    skipped_in: Counter = field(default_factory=Counter)  # split -> rows, for the skips a reader knows the split of
    clipped: Counter = field(default_factory=Counter)  # reason -> rows kept after clipping
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to MAX_EXAMPLES rows

    def skip(self, reason: str, n: int = 1, example: str | None = None, split: str | None = None) -> None:
        self.skipped[reason] += n
        if split is not None:
            self.skipped_in[split] += n
        self._example(reason, example)

    def clip(self, reason: str, example: str | None = None) -> None:
        self.clipped[reason] += 1
        self._example(reason, example)

    def _example(self, reason: str, example: str | None) -> None:
        if example is not None and len(shown := self.examples.setdefault(reason, [])) < MAX_EXAMPLES:
            shown.append(example)

    def summary(self) -> str:
        kept = ", ".join(f"{s}={n}" for s, n in sorted(self.kept.items())) or "nothing"
        text = f"{self.benchmark}: kept {kept}"
        for word, counts in (("skipped", self.skipped), ("clipped", self.clipped)):
            if counts:
                text += f"; {word} " + ", ".join(f"{n} {r}{self._eg(r)}" for r, n in sorted(counts.items()))
        return text

    def by_split(self) -> list[str]:
        """One line per split read: rows kept and rows skipped (`skyeye data inspect`)."""
        order = ("train", "val", "test", "test_phili")
        splits = sorted(set(self.kept) | set(self.skipped_in), key=lambda s: (order.index(s) if s in order else 9, s))
        return [f"{s}: kept {self.kept[s]}, skipped {self.skipped_in[s]}" for s in splits]

    def _eg(self, reason: str) -> str:
        shown = self.examples.get(reason)
        return f" (e.g. {shown[0]})" if shown else ""


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
