"""Draws a `Scene` as a top-down RS image: textured land use, water, roads, objects
with shadows (sun from the top left), sensor grain. Pure numpy + PIL, seeded by the
scene, so the same scene gives the same bytes.

Small images are drawn at twice their size and downsampled, which anti-aliases edges
the way a real sensor's point-spread function would.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import COLOURS, Scene, SceneObject

# Ground colours per land use (default city style); texture: (noise scale, strength).
GROUND = {
    "residential": ((112, 128, 96), 6, 18), "industrial": ((150, 146, 138), 8, 14),
    "airport": ((146, 148, 112), 5, 14), "harbour": ((158, 154, 146), 6, 12),
    "parking lot": ((84, 84, 88), 10, 8), "sports field": ((92, 140, 72), 4, 10),
    "farmland": ((128, 138, 84), 3, 10), "forest": ((46, 82, 44), 24, 26),
    "river": ((108, 132, 82), 6, 16), "beach": ((220, 202, 162), 8, 10),
    "desert": ((210, 178, 128), 4, 16), "meadow": ((128, 158, 90), 8, 14),
}
WATER = (46, 84, 118)
ROAD = (92, 92, 96)
# RSVQA-HR test set 2 comes from another city; ours is browner, warmer and harsher.
PHILI_CAST = np.array([1.08, 0.92, 0.80], dtype=np.float32)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] at `size` px with `cells` blobs across."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img) * 2 - 1


def _ground(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    base, cells, strength = GROUND[scene.land_use]
    arr = np.empty((size, size, 3), dtype=np.float32)
    arr[:] = base
    arr += (_noise(rng, size, cells) * strength)[..., None]
    arr += (_noise(rng, size, max(cells * 6, 24)) * strength * 0.5)[..., None]
    if scene.land_use == "farmland":  # parcels of crops in stripes of different greens and browns
        cuts = np.sort(rng.uniform(0, 1, 3)) * size
        edges = np.concatenate([[0], cuts, [size]]).astype(int)
        yy, xx = np.mgrid[0:size, 0:size]
        for i in range(len(edges) - 1):
            tint = rng.choice([(150, 150, 80), (100, 130, 60), (170, 140, 90), (120, 150, 70)])
            period = rng.uniform(0.015, 0.04) * size
            stripe = (np.sin((xx if i % 2 else yy) / period * np.pi) * 8)[edges[i]:edges[i + 1]]
            arr[edges[i]:edges[i + 1]] = np.array(tint, np.float32) + stripe[..., None] + \
                arr[edges[i]:edges[i + 1]] - base
    if scene.land_use == "desert":  # dunes
        yy, xx = np.mgrid[0:size, 0:size] / size
        arr += (np.sin((xx * 0.6 + yy) * 18 + _noise(rng, size, 3) * 2) * 12)[..., None]
    if scene.land_use in ("forest", "residential", "meadow", "river"):  # tree canopies
        canopy = np.clip(_noise(rng, size, max(size // 6, 8)), 0.35, 1) - 0.35
        density = {"forest": 1.4, "residential": 0.7, "meadow": 0.5, "river": 0.6}[scene.land_use]
        arr -= (canopy * 90 * density)[..., None] * np.array([0.9, 0.4, 0.9], np.float32)
    return arr


def _water_and_roads(scene: Scene, arr: np.ndarray, rng: np.random.Generator) -> None:
    size = arr.shape[0]
    ripple = _noise(rng, size, size // 8) * 6
    for x1, y1, x2, y2 in scene.water:
        a, b, c, d = (int(round(v * size)) for v in (y1, y2, x1, x2))
        arr[a:b, c:d] = np.array(WATER, np.float32) + ripple[a:b, c:d, None]
        if scene.land_use == "beach":  # foam along the shore
            arr[a:b, max(c - 2, 0):c + 2] = (225, 230, 228)
    for direction, pos in scene.roads:
        half = 0.045 if scene.land_use == "airport" else 0.03  # the airport's road is its runway
        lo, hi = int((pos - half) * size), int((pos + half) * size)
        sl = (slice(lo, hi), slice(None)) if direction == "h" else (slice(None), slice(lo, hi))
        arr[sl] = np.array(ROAD, np.float32) + ripple[sl][..., None] * 0.5
        mid, dash = (lo + hi) // 2, max(size // 32, 2)
        for start in range(0, size, dash * 2):  # dashed centre line
            line = (slice(mid, mid + max(size // 128, 1)), slice(start, start + dash)) if direction == "h" \
                else (slice(start, start + dash), slice(mid, mid + max(size // 128, 1)))
            arr[line] = (210, 210, 200)


def render_background(scene: Scene, size: int) -> np.ndarray:
    """Ground, water and roads as float32 (H, W, 3); reused by every frame of a clip."""
    rng = np.random.default_rng(scene.texture_seed)
    arr = _ground(scene, size, rng)
    _water_and_roads(scene, arr, rng)
    return arr


def _px(points, size):
    return [(x * size, y * size) for x, y in points]


def draw_objects(background: np.ndarray, scene: Scene, objects: list[SceneObject],
                 offsets: list[tuple[float, float]] | None = None) -> Image.Image:
    """Objects (with shadows) over a background; `offsets` move each object (videos)."""
    size = background.shape[0]
    offsets = offsets or [(0.0, 0.0)] * len(objects)
    shadow = Image.new("L", (size, size), 0)
    sdraw = ImageDraw.Draw(shadow)
    for obj, (dx, dy) in zip(objects, offsets, strict=True):
        if obj.category != "bridge":
            height = {"building": 0.025, "storage tank": 0.02, "airplane": 0.012}.get(obj.category, 0.006)
            sdraw.polygon(_px(obj.polygon(dx + height, dy + height), size), fill=255)
    shade = np.asarray(shadow.filter(ImageFilter.BoxBlur(max(size // 200, 1))), dtype=np.float32) / 255
    arr = background * (1 - 0.45 * shade[..., None])
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for obj, (dx, dy) in zip(objects, offsets, strict=True):
        _draw_object(draw, obj, dx, dy, size)
    return img


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, dx: float, dy: float, size: int) -> None:
    colour = COLOURS[obj.colour]
    dark = tuple(int(c * 0.62) for c in colour)
    poly = _px(obj.polygon(dx, dy), size)
    line = max(size // 160, 1)
    draw.polygon(poly, fill=colour, outline=dark)
    cx, cy = obj.centre[0] + dx, obj.centre[1] + dy
    if obj.category == "storage tank":  # roof ring
        r = min(obj.length, obj.width) * size * 0.28
        draw.ellipse((cx * size - r, cy * size - r, cx * size + r, cy * size + r), outline=dark, width=line)
    elif obj.category == "tennis court":  # white court lines and the net
        draw.polygon(_px(_scaled(obj, 0.8, 0.8, dx, dy), size), outline=(240, 240, 240), width=line)
        a, b = _scaled(obj, 0.0, 0.8, dx, dy)[0:2]
        draw.line(_px([a, b], size), fill=(240, 240, 240), width=line)
    elif obj.category == "building":  # roof ridge
        a, b = _scaled(obj, 0.9, 0.0, dx, dy)[1:3]
        draw.line(_px([a, b], size), fill=dark, width=line)
    elif obj.category == "ship":  # bridge house towards the stern
        draw.polygon(_px(_scaled(obj, 0.25, 0.5, dx, dy, shift=-0.25), size), fill=dark)
    elif obj.category == "vehicle":  # windscreen
        draw.polygon(_px(_scaled(obj, 0.18, 0.8, dx, dy, shift=0.18), size), fill=(40, 44, 52))


def _scaled(obj: SceneObject, fl: float, fw: float, dx: float, dy: float, shift: float = 0.0):
    """A rectangle inside the object: fraction fl of its length, fw of its width, moved
    `shift` lengths along the heading."""
    a = math.radians(obj.angle)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = obj.centre[0] + dx + shift * obj.length * ca, obj.centre[1] + dy + shift * obj.length * sa
    pts = [(0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.5, -0.5)]
    return [(cx + x * obj.length * fl * ca - y * obj.width * fw * sa,
             cy + x * obj.length * fl * sa + y * obj.width * fw * ca) for x, y in pts]


def finish(img: Image.Image, scene: Scene, size: int) -> Image.Image:
    """Downsample the supersampled drawing, add the city style and sensor grain."""
    if img.size[0] != size:
        img = img.resize((size, size), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    if scene.style == "phili":
        arr = (arr - 128) * 1.18 + 128
        arr *= PHILI_CAST
    rng = np.random.default_rng(scene.texture_seed + 1)
    arr += rng.normal(0, 3.0, arr.shape[:2]).astype(np.float32)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels."""
    work = size * 2 if size <= 320 else size
    return finish(draw_objects(render_background(scene, work), scene, scene.objects), scene, size)
