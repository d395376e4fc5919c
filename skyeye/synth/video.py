"""CapERA-style UAV clips: a few seconds of a scene in which objects move, with five
captions that say what moves, how and where. Written as MP4 (MPEG-4 Part 2, one
encoder thread and bit-exact flags, so the same seed gives the same bytes)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from .render import draw_objects, finish, render_background
from .scene import Scene, SceneObject, outline, sample_scene

EVENTS = ("traffic_congestion", "car_racing", "boating", "harvesting", "non-event")
FRAMES, FPS = 10, 2  # 5 s, like CapERA's clips
# how captions say where things move: (horizontal, forward) -> words
DIRECTIONS = {(True, True): "from left to right", (True, False): "from right to left",
              (False, True): "from top to bottom", (False, False): "from bottom to top"}


def _mover(category: str, colour: str, cx: float, cy: float, angle: float, length: float, width: float) -> SceneObject:
    pts = outline(category, length, width, angle)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return SceneObject(category, colour, (cx + min(xs), cy + min(ys), cx + max(xs), cy + max(ys)), angle, length, width)


def event_scene(event: str, rng: np.random.Generator) -> tuple[Scene, list[tuple[float, float]], str]:
    """A scene for `event`, per-object velocity (normalised units per frame) and the
    direction word used in captions."""
    colours = ["red", "white", "blue", "yellow", "grey"]
    if event in ("traffic_congestion", "car_racing"):
        horizontal = rng.random() < 0.5
        pos = float(rng.uniform(0.35, 0.65))
        forward = rng.random() < 0.5
        n = int(rng.integers(4, 7)) if event == "traffic_congestion" else int(rng.integers(1, 3))
        speed = 0.012 if event == "traffic_congestion" else 0.06
        angle = (0.0 if forward else 180.0) if horizontal else (90.0 if forward else 270.0)
        objs, vel = [], []
        # the queue (or the racers) start near the edge they come from and trail behind the
        # leader, so every vehicle stays inside the frame for the whole clip
        start, behind = (0.12, 1.0) if forward else (0.88, -1.0)
        for i in range(n):
            along = start + behind * i * (0.13 if event == "traffic_congestion" else 0.0)
            lane = pos + (rng.uniform(-0.012, 0.012) if event == "traffic_congestion" else (i - (n - 1) / 2) * 0.035)
            cx, cy = (along, lane) if horizontal else (lane, along)
            objs.append(_mover("vehicle", str(rng.choice(colours)), cx, cy, angle, 0.09, 0.045))
            d = speed if forward else -speed
            vel.append((d, 0.0) if horizontal else (0.0, d))
        direction = DIRECTIONS[(horizontal, forward)]
        scene = Scene(str(rng.choice(["residential", "industrial", "meadow"])), "default", objs,
                      roads=[("h" if horizontal else "v", pos)], texture_seed=int(rng.integers(0, 2**31 - 1)))
        return scene, vel, direction
    if event == "boating":
        c = float(rng.uniform(0.4, 0.6))
        water = [(0.0, c - 0.18, 1.0, c + 0.18)]
        n = int(rng.integers(1, 3))
        forward = rng.random() < 0.5
        objs = [_mover("ship", str(rng.choice(["white", "red", "blue", "yellow"])),
                       0.2 + 0.45 * i if forward else 0.8 - 0.45 * i,
                       c + (i - (n - 1) / 2) * 0.12, 0.0 if forward else 180.0, 0.2, 0.06) for i in range(n)]
        scene = Scene("river", "default", objs, water=water, texture_seed=int(rng.integers(0, 2**31 - 1)))
        d = 0.025 if forward else -0.025
        return scene, [(d, 0.0)] * n, DIRECTIONS[(True, forward)]
    if event == "harvesting":
        forward = rng.random() < 0.5
        y = float(rng.uniform(0.3, 0.7))
        objs = [_mover("vehicle", "yellow", 0.15 if forward else 0.85, y, 0.0 if forward else 180.0, 0.12, 0.07)]
        scene = Scene("farmland", "default", objs, texture_seed=int(rng.integers(0, 2**31 - 1)))
        return scene, [(0.02 if forward else -0.02, 0.0)], DIRECTIONS[(True, forward)]
    if event == "non-event":
        scene = sample_scene(rng, land_use=str(rng.choice(["residential", "forest", "meadow", "parking lot"])))
        return scene, [(0.0, 0.0)] * len(scene.objects), ""
    raise ValueError(f"unknown event {event!r}; known: {EVENTS}")


def clip_captions(event: str, scene: Scene, direction: str) -> list[str]:
    objs = scene.objects
    colours = " and ".join(sorted({o.colour for o in objs})) if objs else ""
    n = len(objs)
    if event == "traffic_congestion":
        return [f"{n} vehicles move slowly along the road {direction}.",
                f"a traffic jam of {n} cars on the road.",
                f"cars queue bumper to bumper on a road moving {direction}.",
                f"heavy traffic with {colours} vehicles crawling along the road.",
                f"a line of {n} vehicles is stuck in traffic."]
    if event == "car_racing":
        what = "a car" if n == 1 else f"{n} cars"
        return [f"{what} race fast along the road {direction}." if n > 1
                else f"a {objs[0].colour} car races fast along the road {direction}.",
                f"{what} speeding on an empty road.",
                f"a fast {colours} car drives {direction} on the road." if n == 1
                else f"{colours} cars speed {direction}.",
                f"a car race seen from above, moving {direction}.",
                f"{what} rushing along the road at high speed."]
    if event == "boating":
        what = f"a {objs[0].colour} boat" if n == 1 else f"{n} boats"
        return [f"{what} {'sails' if n == 1 else 'sail'} along the river {direction}.",
                f"boating on a river with {what}.",
                f"{what} {'moves' if n == 1 else 'move'} across the water {direction}.",
                f"a river with {what} sailing {direction}.",
                f"{colours} boats on the river." if n > 1 else f"a {objs[0].colour} boat on the river."]
    if event == "harvesting":
        return [f"a yellow harvester drives across the farmland {direction}.",
                "a harvester working in the fields.",
                f"harvesting crops with a machine moving {direction}.",
                "a farm vehicle harvests the field.",
                f"a yellow machine crosses the crop field {direction}."]
    lu = scene.land_use
    return [f"a still view of a {lu} area with nothing moving.",
            f"nothing happens in this {lu} scene.",
            f"a quiet {lu} area seen from a drone.",
            f"a static aerial view of a {lu}.",
            f"no movement over the {lu}."]


def write_clip(path: Path, scene: Scene, velocities: list[tuple[float, float]], size: int) -> None:
    work = size * 2 if size <= 320 else size
    background = render_background(scene, work)
    container = av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"})
    try:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"flags": "+bitexact", "qscale": "3"}
        for t in range(FRAMES):
            offsets = [(vx * t, vy * t) for vx, vy in velocities]
            img = finish(draw_objects(background, scene, scene.objects, offsets), scene, size)
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


def read_frames(path: Path, n: int) -> list:
    """`n` evenly spaced frames of a clip as PIL images (how the model sees a video)."""
    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


