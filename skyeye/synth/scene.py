"""Scene ground truth for SkyEye-Synth: what is where in one top-down RS image.

A `Scene` is sampled from a seeded generator before anything is drawn; every caption,
question and referring expression is derived from it (`language.py`), and the pixels
are drawn from it (`render.py`), so the text can be learned only by looking.
Coordinates are normalised to [0, 1] (x right, y down), so one scene renders at any size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Land uses and whether RSVQA would call them urban; each lists the objects it holds
# (category -> (min, max) instances) and where they stand.
LAND_USES: dict[str, dict] = {
    "residential": {"urban": True, "objects": {"building": (3, 6), "vehicle": (0, 3), "tennis court": (0, 1)}},
    "industrial": {"urban": True, "objects": {"storage tank": (2, 5), "building": (1, 3), "vehicle": (0, 2)}},
    "airport": {"urban": True, "objects": {"airplane": (1, 4), "vehicle": (0, 2), "building": (0, 1)}},
    "harbour": {"urban": True, "objects": {"ship": (1, 4), "storage tank": (0, 3), "building": (0, 1)}},
    "parking lot": {"urban": True, "objects": {"vehicle": (3, 7), "building": (0, 1)}},
    "sports field": {"urban": True, "objects": {"tennis court": (1, 3), "building": (0, 2), "vehicle": (0, 2)}},
    "farmland": {"urban": False, "objects": {"building": (0, 2), "vehicle": (0, 1)}},
    "forest": {"urban": False, "objects": {"building": (0, 1)}},
    "river": {"urban": False, "objects": {"bridge": (0, 1), "ship": (0, 2), "building": (0, 1)}},
    "beach": {"urban": False, "objects": {"ship": (0, 2), "building": (0, 1)}},
    "desert": {"urban": False, "objects": {"storage tank": (0, 2), "vehicle": (0, 2)}},
    "meadow": {"urban": False, "objects": {"building": (0, 1), "vehicle": (0, 1)}},
}
CATEGORIES = ("airplane", "ship", "vehicle", "storage tank", "building", "tennis court", "bridge")
PLURAL = {"airplane": "airplanes", "ship": "ships", "vehicle": "vehicles", "storage tank": "storage tanks",
          "building": "buildings", "tennis court": "tennis courts", "bridge": "bridges"}
# Side length as a fraction of the image: large enough to be seen at 128 px, and, as in
# DIOR-RSVG, referred objects are mostly large in the image.
SIZE_RANGE = {"airplane": (0.16, 0.30), "ship": (0.14, 0.28), "vehicle": (0.07, 0.11),
              "storage tank": (0.10, 0.18), "building": (0.12, 0.24), "tennis court": (0.14, 0.22),
              "bridge": (0.14, 0.20)}
COLOURS = {"white": (236, 236, 232), "red": (200, 40, 36), "blue": (40, 80, 200),
           "yellow": (232, 196, 40), "grey": (110, 110, 116), "green": (40, 150, 60)}
# Which colours each category comes in (tennis courts are painted, tanks are white or grey...).
CATEGORY_COLOURS = {"airplane": ("white", "red", "blue", "grey"), "ship": ("white", "red", "blue", "yellow"),
                    "vehicle": ("white", "red", "blue", "yellow", "grey"), "storage tank": ("white", "grey", "red"),
                    "building": ("white", "red", "blue", "grey"), "tennis court": ("green", "blue", "red"),
                    "bridge": ("grey", "white")}
WATER_CATEGORIES = {"ship"}


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    box: tuple[float, float, float, float]  # normalised x1, y1, x2, y2 of the rotated shape's extent
    angle: float  # heading in degrees (0 = pointing right)
    length: float  # along the heading, normalised
    width: float

    def polygon(self, dx: float = 0.0, dy: float = 0.0) -> list[tuple[float, float]]:
        """Outline in normalised image coordinates, optionally shifted (videos move objects)."""
        cx, cy = self.centre
        return [(cx + dx + x, cy + dy + y) for x, y in outline(self.category, self.length, self.width, self.angle)]

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass
class Scene:
    land_use: str
    style: str  # "default", or "phili": a visibly different city style (RSVQA-HR test set 2)
    objects: list[SceneObject]
    water: list[tuple[float, float, float, float]] = field(default_factory=list)  # water rectangles
    roads: list[tuple[str, float]] = field(default_factory=list)  # ("h"|"v", position)
    texture_seed: int = 0

    @property
    def urban(self) -> bool:
        return LAND_USES[self.land_use]["urban"]

    def count(self, category: str) -> int:
        return sum(o.category == category for o in self.objects)


def _water_layout(land_use: str, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    if land_use == "river":
        c, w = rng.uniform(0.35, 0.65), rng.uniform(0.22, 0.32)
        return [(0.0, c - w / 2, 1.0, c + w / 2)] if rng.random() < 0.5 else [(c - w / 2, 0.0, c + w / 2, 1.0)]
    if land_use == "harbour":
        return [(0.0, rng.uniform(0.45, 0.6), 1.0, 1.0)]
    if land_use == "beach":
        return [(rng.uniform(0.45, 0.6), 0.0, 1.0, 1.0)]
    return []


def _in_water(x: float, y: float, water) -> bool:
    return any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in water)


def _overlaps(box, others, margin=0.02) -> bool:
    return any(not (box[2] + margin < o[0] or o[2] + margin < box[0]
                    or box[3] + margin < o[1] or o[3] + margin < box[1]) for o in others)


# Outlines in local units (x along the heading, both axes spanning [-0.5, 0.5]); the
# drawn polygon and the annotated box come from the same points, so boxes are tight.
_OUTLINES = {
    "airplane": [(0.5, 0), (0.42, 0.05), (0.08, 0.06), (-0.06, 0.5), (-0.16, 0.5), (-0.08, 0.06), (-0.36, 0.05),
                 (-0.46, 0.2), (-0.52, 0.2), (-0.48, 0), (-0.52, -0.2), (-0.46, -0.2), (-0.36, -0.05),
                 (-0.08, -0.06), (-0.16, -0.5), (-0.06, -0.5), (0.08, -0.06), (0.42, -0.05)],
    "ship": [(0.5, 0), (0.25, 0.5), (-0.5, 0.45), (-0.5, -0.45), (0.25, -0.5)],
    "storage tank": [(0.5 * math.cos(t), 0.5 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 20, endpoint=False)],
}
_RECT = [(0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.5, -0.5)]


def outline(category: str, length: float, width: float, angle: float) -> list[tuple[float, float]]:
    """The object's polygon as offsets from its centre, in normalised image units."""
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    pts = _OUTLINES.get(category, _RECT)
    return [(x * length * ca - y * width * sa, x * length * sa + y * width * ca) for x, y in pts]


def sample_scene(rng: np.random.Generator, land_use: str | None = None, style: str = "default",
                 max_objects: int = 7) -> Scene:
    """Draw one scene: land use, water and roads, then non-overlapping objects placed
    where they belong (ships on water, everything else on land)."""
    land_use = land_use or str(rng.choice(list(LAND_USES)))
    water = _water_layout(land_use, rng)
    roads = _road_layout(land_use, water, rng)
    road_boxes = [(0.0, p - 0.04, 1.0, p + 0.04) if d == "h" else (p - 0.04, 0.0, p + 0.04, 1.0) for d, p in roads]
    objects: list[SceneObject] = []
    for category, (lo, hi) in LAND_USES[land_use]["objects"].items():
        for _ in range(int(rng.integers(lo, hi + 1))):
            if len(objects) >= max_objects:
                break
            place = _place_bridge if category == "bridge" else _place_on_ground
            obj = place(category, rng, water, road_boxes, [o.box for o in objects])
            if obj is not None:
                objects.append(obj)
    return Scene(land_use, style, objects, water, roads, texture_seed=int(rng.integers(0, 2**31 - 1)))


def _road_layout(land_use: str, water, rng: np.random.Generator) -> list[tuple[str, float]]:
    """At most one straight road, never in a scene with water."""
    if land_use in ("residential", "industrial", "parking lot", "airport") or rng.random() < 0.25:
        if not water:
            return [(str(rng.choice(["h", "v"])), float(rng.uniform(0.25, 0.75)))]
    return []


_PLACEMENT_ATTEMPTS = 30  # tries per object before it is left out


def _box_of(pts: list[tuple[float, float]], cx: float, cy: float) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (cx + min(xs), cy + min(ys), cx + max(xs), cy + max(ys))


def _new_object(category: str, rng: np.random.Generator, box, angle: float, length: float,
                width: float) -> SceneObject:
    colour = str(rng.choice(CATEGORY_COLOURS[category]))
    return SceneObject(category, colour, tuple(float(v) for v in box), float(angle), float(length), float(width))


def _place_bridge(category: str, rng: np.random.Generator, water, road_boxes, taken) -> SceneObject | None:
    """A bridge spans the first water body (its box clipped to the image); None without water
    or when every try overlaps an object already placed."""
    if not water:
        rng.uniform(*SIZE_RANGE[category])  # the draw a try makes first: later scenes depend on it
        return None
    x1, y1, x2, y2 = water[0]
    across_h = (x2 - x1) >= 0.99  # horizontal river: the bridge runs vertically
    angle = 90.0 if across_h else 0.0
    for _attempt in range(_PLACEMENT_ATTEMPTS):
        side = rng.uniform(*SIZE_RANGE[category])
        length, width = (y2 - y1 if across_h else x2 - x1) + 0.12, side * 0.45
        cx = rng.uniform(0.2, 0.8) if across_h else (x1 + x2) / 2
        cy = (y1 + y2) / 2 if across_h else rng.uniform(0.2, 0.8)
        box = tuple(min(max(v, 0.0), 1.0) for v in _box_of(outline(category, length, width, angle), cx, cy))
        if not _overlaps(box, taken):
            return _new_object(category, rng, box, angle, length, width)
    return None


_ASPECT = {"airplane": 1.0, "ship": 0.3, "vehicle": 0.5, "storage tank": 1.0, "tennis court": 0.5}  # width/length
_AXIS_ALIGNED = ("building", "tennis court", "storage tank")  # headings 0 or 90 only


def _place_on_ground(category: str, rng: np.random.Generator, water, road_boxes, taken) -> SceneObject | None:
    """Any other object, inside the image: ships with their centre on water, the rest wholly on
    land, off the roads (vehicles excepted) and clear of the objects placed; None when every
    try fails."""
    for _attempt in range(_PLACEMENT_ATTEMPTS):
        side = rng.uniform(*SIZE_RANGE[category])
        building_aspect = rng.uniform(0.6, 1.0)  # drawn for every category: later draws depend on it
        aspect = building_aspect if category == "building" else _ASPECT[category]
        angle = float(rng.choice([0, 90])) if category in _AXIS_ALIGNED else float(rng.uniform(0, 360))
        length, width = side, side * aspect
        pts = outline(category, length, width, angle)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        cx = rng.uniform(0.02 - min(xs), 0.98 - max(xs))
        cy = rng.uniform(0.02 - min(ys), 0.98 - max(ys))
        box = _box_of(pts, cx, cy)
        if _in_water(cx, cy, water) != (category in WATER_CATEGORIES):
            continue
        corners = ((box[0], box[1]), (box[2], box[3]), (box[0], box[3]), (box[2], box[1]))
        if category not in WATER_CATEGORIES and any(_in_water(x, y, water) for x, y in corners):
            continue
        if category != "vehicle" and _overlaps(box, road_boxes, margin=0.0):
            continue
        if not _overlaps(box, taken):
            return _new_object(category, rng, box, angle, length, width)
    return None
