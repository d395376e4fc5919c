"""SkyEye-Synth: deterministic, in the native layouts, and its text is true of its pixels."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skyeye.data.readers import detect_benchmark, read_benchmark
from skyeye.formats.benchmarks import BENCHMARKS, SPLITS
from skyeye.synth.corpus import synthesize
from skyeye.synth.language import captions, questions, referring_expression, region
from skyeye.synth.render import draw_objects, render
from skyeye.synth.scene import Scene, SceneObject, outline, sample_scene
from skyeye.synth.video import EVENTS, FRAMES, event_scene, read_frames, write_clip


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_synth, tmp_path):
    again = tmp_path / "again"
    synthesize(again, scale="tiny", seed=0, workers=2, progress=False)  # other worker count, same bytes
    assert _digest(again) == _digest(tiny_synth)
    other = tmp_path / "other"
    synthesize(other, scale="tiny", seed=1, workers=1, progress=False, benchmarks=("ucm_captions",))
    assert _digest(other / "ucm_captions") != _digest(tiny_synth / "ucm_captions")


def test_every_benchmark_folder_is_read_by_the_native_readers(tiny_synth):
    for name in BENCHMARKS:
        folder = tiny_synth / name
        assert detect_benchmark(folder) == name
        samples, report = read_benchmark(name, folder)
        splits = {s.split for s in samples}
        # CapERA as released has no val split (the builder holds part of train out)
        assert splits == set(SPLITS[name]) - ({"val"} if name == "capera" else set()), name
        images_by_split: dict[str, set] = {}
        for s in samples:
            assert s.image.exists()
            images_by_split.setdefault(s.split, set()).add(s.image)
        seen: set = set()
        for imgs in images_by_split.values():  # no image in two splits
            assert not (imgs & seen), name
            seen |= imgs


def test_native_layout_details(tiny_synth):
    ucm = json.loads((tiny_synth / "ucm_captions/dataset.json").read_text())
    assert ucm["dataset"] == "ucm" and all(len(i["sentences"]) == 5 for i in ucm["images"])
    assert (tiny_synth / "rsicd/dataset_rsicd.json").exists()
    lr = json.loads((tiny_synth / "rsvqa_lr/LR_split_test_questions.json").read_text())["questions"]
    assert {"id", "img_id", "type", "question", "answers_ids", "active"} <= set(lr[0])
    hr_stub = json.loads((tiny_synth / "rsvqa_hr/USGS_split_train_questions.json").read_text())["questions"]
    assert set(hr_stub[0]) == {"id", "active"}  # the variant with text in all_questions.json
    assert (tiny_synth / "rsvqa_hr/USGS_split_test_phili_images.json").exists()
    lines = (tiny_synth / "dior_rsvg/test.txt").read_text().split()
    assert all(x.isdigit() for x in lines)
    # CapERA as released: a file per split, CRLF, ERA's <split>/<Event>/<Event>_NNN.mp4 numbered per split
    raw = (tiny_synth / "capera/CapERA_DATASET_test.json").read_bytes()
    assert raw.count(b"\n") == raw.count(b"\r\n") > 0 and not (tiny_synth / "capera/captions.json").exists()
    ids = {split: [e["video_id"] for e in json.loads((tiny_synth / f"capera/CapERA_DATASET_{split}.json")
                                                     .read_bytes())["ERA_caption"]] for split in ("train", "test")}
    assert "Boating_001.mp4" in ids["train"] and "Boating_001.mp4" in ids["test"]
    assert (tiny_synth / "capera/test/Boating/Boating_001.mp4").is_file()
    # RSVG as released: rsvg_<split>.pth lists of (img_file, [x1, y1, x2, y2] int pixels, phrase, _)
    rows = torch.load(tiny_synth / "rsvg/rsvg_train.pth", weights_only=True)
    img_file, box, phrase, _ = rows[0]
    assert (tiny_synth / "rsvg/images" / img_file).is_file() and isinstance(phrase, str)
    assert len(box) == 4 and all(isinstance(v, int) for v in box) and box[0] < box[2] and box[1] < box[3]
    with Image.open(next((tiny_synth / "rsvqa_lr/Images_LR").glob("*.tif"))) as im:
        assert im.format == "TIFF" and im.size == (64, 64)


def test_vqa_types_and_answers_follow_the_scene():
    objs = [SceneObject("ship", "red", (0.1, 0.1, 0.3, 0.2), 0.0, 0.2, 0.06),
            SceneObject("ship", "white", (0.6, 0.6, 0.8, 0.7), 0.0, 0.2, 0.06),
            SceneObject("storage tank", "grey", (0.1, 0.7, 0.2, 0.8), 0.0, 0.1, 0.1)]
    scene = Scene("harbour", "default", objs, water=[(0, 0.5, 1, 1)])
    qas = questions(scene, np.random.default_rng(0), ("presence", "comp", "rural_urban", "count", "area"), 60)
    assert {t for _, _, t in qas} == {"presence", "comp", "rural_urban", "count", "area"}
    for q, a, t in qas:
        if t == "count" and "ships" in q:
            assert a == "2"
        if t == "count" and "storage tanks" in q:
            assert a == "1"
        if t == "rural_urban":
            assert a == "urban"
        if t == "presence" and ("ship" in q or "storage tank" in q):
            assert a == "yes"
        if t == "presence" and "airplane" in q:
            assert a == "no"
        if q == "are there more ships than storage tanks?":
            assert a == "yes"


def test_referring_expressions_single_out_one_object():
    twins = [SceneObject("airplane", "red", (0.05, 0.05, 0.25, 0.25), 0.0, 0.2, 0.2),
             SceneObject("airplane", "red", (0.70, 0.70, 0.90, 0.90), 0.0, 0.2, 0.2),
             SceneObject("airplane", "white", (0.70, 0.05, 0.90, 0.25), 0.0, 0.2, 0.2)]
    scene = Scene("airport", "default", twins)
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = referring_expression(twins[0], scene, rng)
        assert text is not None and text not in ("the red airplane", "the airplane")
        assert "top left" in text or "leftmost" in text
    # Two objects that nothing tells apart get no expression at all: same kind, colour, size
    # and region (top left), centres 0.06 apart (less than the 0.1 "leftmost" asks), no road.
    same = [SceneObject("vehicle", "red", (0.10, 0.1, 0.15, 0.13), 0.0, 0.05, 0.03),
            SceneObject("vehicle", "red", (0.16, 0.1, 0.21, 0.13), 0.0, 0.05, 0.03)]
    assert referring_expression(same[0], Scene("parking lot", "default", same), rng) is None
    # 0.2 apart, still both top left: only "leftmost" tells the left one, and nothing the other.
    apart = [SceneObject("vehicle", "red", (0.025, 0.1, 0.075, 0.13), 0.0, 0.05, 0.03),
             SceneObject("vehicle", "red", (0.225, 0.1, 0.275, 0.13), 0.0, 0.05, 0.03)]
    scene = Scene("parking lot", "default", apart)
    assert referring_expression(apart[0], scene, rng) == "the leftmost vehicle"
    assert referring_expression(apart[1], scene, rng) is None


def _polygon_area_and_perimeter(points: list[tuple[float, float]]) -> tuple[float, float]:
    x, y = np.array(points).T
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    return area, float(np.hypot(x - np.roll(x, 1), y - np.roll(y, 1)).sum())


@pytest.mark.parametrize("seed,land_use", [(3, "airport"), (1, "harbour"), (4, "industrial")])
def test_grounding_boxes_cover_the_drawn_object(seed, land_use):
    scene = sample_scene(np.random.default_rng(seed), land_use=land_use)
    assert scene.objects
    img = np.asarray(render(scene, 128), dtype=np.float32)
    work = 256  # render draws at twice the size of a 128-px image, then downsamples
    for obj in scene.objects:
        # The object alone, drawn on black (its shadow darkens nothing there): its footprint.
        drawn = draw_objects(np.zeros((work, work, 3), np.float32), scene, [obj])
        ys, xs = np.nonzero(np.asarray(drawn).sum(-1) > 0)
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        # The box is the drawing's extent: each side within 1.5 work pixels (under one pixel of
        # the image), the polygon's one-pixel outline included.
        assert np.abs(extent - np.array(obj.box) * work).max() <= 1.5, obj
        # Filled: the footprint is the polygon's area, plus at most its one-pixel outline.
        area, perimeter = _polygon_area_and_perimeter([(x * work, y * work) for x, y in obj.polygon()])
        assert area <= len(xs) <= area + perimeter, obj
        # And seen in the image: most of the footprint differs from the scene without the object.
        without = Scene(scene.land_use, scene.style, [o for o in scene.objects if o is not obj], scene.water,
                        scene.roads, scene.texture_seed)
        changed = np.abs(img - np.asarray(render(without, 128), dtype=np.float32)).sum(-1) > 60
        footprint = np.asarray(drawn.resize((128, 128))).sum(-1) > 0
        assert (changed & footprint).sum() >= 0.75 * footprint.sum(), obj


def test_captions_are_five_and_say_what_is_there():
    scene = sample_scene(np.random.default_rng(5), land_use="harbour")
    caps = captions(scene, np.random.default_rng(0))
    assert len(caps) == 5 and len(set(caps)) >= 4
    assert any("harbour" in c for c in caps)


def test_phili_style_is_visibly_different():
    means = {}
    for style in ("default", "phili"):
        imgs = [np.asarray(render(sample_scene(np.random.default_rng(i), land_use="residential", style=style), 64),
                           dtype=np.float32) for i in range(6)]
        means[style] = np.mean([im.mean(axis=(0, 1)) for im in imgs], axis=0)
    # warmer: more red relative to blue
    assert means["phili"][0] / means["phili"][2] > 1.2 * means["default"][0] / means["default"][2]


@pytest.mark.parametrize("event", EVENTS)
def test_clips_move_unless_nothing_happens(event, tmp_path):
    scene, vel, _ = event_scene(event, np.random.default_rng(1))
    path = tmp_path / "clip.mp4"
    write_clip(path, scene, vel, 64)
    frames = [np.asarray(f, dtype=np.float32) for f in read_frames(path, 10)]
    assert len(frames) == 10
    moved = (np.abs(frames[-1] - frames[0]).max(-1) > 40).mean()  # share of pixels that changed (not codec noise)
    assert (moved < 0.0005) if event == "non-event" else (moved > 0.001), moved


@pytest.mark.parametrize("event", EVENTS)
def test_every_vehicle_a_clip_counts_stays_in_view(event):
    """The captions count every mover ("5 vehicles ..."), so all of them must be inside the
    frame in every frame, whichever way they go (a queue once trailed off the far edge)."""
    for seed in range(40):
        scene, vel, _ = event_scene(event, np.random.default_rng(seed))
        for obj, (vx, vy) in zip(scene.objects, vel, strict=True):
            for t in (0, FRAMES - 1):
                x1, y1, x2, y2 = obj.box
                assert -0.01 <= x1 + vx * t and x2 + vx * t <= 1.01, (event, seed, t, obj.box)
                assert -0.01 <= y1 + vy * t and y2 + vy * t <= 1.01, (event, seed, t, obj.box)


def test_region_words():
    obj = SceneObject("ship", "red", (0.0, 0.0, 0.1, 0.1), 0.0, 0.1, 0.1)
    assert region(obj) == "top left"
    assert len(outline("airplane", 0.2, 0.2, 45.0)) > 4


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown scale"):
        synthesize(tmp_path / "x", scale="huge")
    assert not (tmp_path / "x").exists()


def test_the_scales_the_configs_accept_are_the_ones_synth_draws():
    """The scale names live in skyeye/config.py (DataConfig and the flows' --scale read them):
    synth must size exactly those."""
    from skyeye.config import SCALE_NAMES, DataConfig
    from skyeye.synth.corpus import SCALES
    assert tuple(SCALES) == SCALE_NAMES
    assert DataConfig().scale in SCALES
