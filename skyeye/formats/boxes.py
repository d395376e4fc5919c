"""Boxes as text, the paper's way: `{<x1><y1><x2><y2>}` on a 0-100 grid (pixel / side
x 100, truncated), several joined by `<delim>`, a phrase with its boxes as
`<p>phrase</p> {...}<delim>{...}`. Used by the instruction builder, the data gate and
the grounding metric alike, so all three agree on one format."""
from __future__ import annotations

import re

GRID = 100
BOX_RE = re.compile(r"\{<(-?\d+)><(-?\d+)><(-?\d+)><(-?\d+)>\}")
# Anything that looks like an attempt at a box, parsable or not (the data gate parses each strictly).
BOX_LIKE_RE = re.compile(r"\{\s*<[^{}]*\}")


def to_grid(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixels -> grid integers, truncated; a box thinner than one grid cell keeps width 1.

    Values are clamped to 0-100, so a box must be checked against its image before it gets
    here: the readers do (`skyeye.data.records.fit_box`: clipped within a tolerance, else
    skipped and reported); the clamp only keeps predicted or rounded boxes on the grid."""
    x1, y1, x2, y2 = box
    g = [int(x1 / width * GRID), int(y1 / height * GRID), int(x2 / width * GRID), int(y2 / height * GRID)]
    g = [min(max(v, 0), GRID) for v in g]
    if g[2] <= g[0]:
        g[0], g[2] = (g[0], g[0] + 1) if g[0] < GRID else (GRID - 1, GRID)
    if g[3] <= g[1]:
        g[1], g[3] = (g[1], g[1] + 1) if g[1] < GRID else (GRID - 1, GRID)
    return g[0], g[1], g[2], g[3]


def box_text(box: tuple[float, float, float, float], width: int, height: int) -> str:
    x1, y1, x2, y2 = to_grid(box, width, height)
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def boxes_text(boxes, width: int, height: int, phrase: str | None = None) -> str:
    text = "<delim>".join(box_text(b, width, height) for b in boxes)
    return f"<p>{phrase}</p> {text}" if phrase else text


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every `{<x1><y1><x2><y2>}` in `text`, as grid integers (not range-checked)."""
    return [tuple(int(v) for v in m.groups()) for m in BOX_RE.finditer(text)]


# a phrase and its boxes, `<p>two ships</p> {..}<delim>{..}`, or boxes alone
_PHRASED_RE = re.compile(r"(?:<p>(.*?)</p>\s*)?((?:\{<-?\d+><-?\d+><-?\d+><-?\d+>\}\s*(?:<delim>\s*)?)+)")


def phrase_boxes(text: str) -> list[tuple[str | None, tuple[int, int, int, int]]]:
    """Every box in an answer with the phrase it belongs to (None for a bare box), grid units."""
    out = []
    for m in _PHRASED_RE.finditer(text):
        phrase = m.group(1).strip() if m.group(1) else None
        out += [(phrase, box) for box in parse_boxes(m.group(2))]
    return out


def first_box_pixels(text: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The first box in a model answer scaled back to pixels; None if there is none."""
    found = BOX_RE.search(text)
    if not found:
        return None
    x1, y1, x2, y2 = (int(v) for v in found.groups())
    return x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
