"""SkyEye-Synth: writes the 8 benchmarks' native layouts from procedural scenes, each as
its authors released it (docs/data.md), so the demo goes through the readers real data does.

Each image's randomness comes from `SeedSequence([seed, benchmark, index])`, so the
work can be spread over processes and the same seed and scale still give the same
bytes. Splits are ranges of image indices: no image is in two splits.
The whole corpus is written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written corpus behind.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from tqdm import tqdm

from ..formats.benchmarks import BENCHMARKS
from ..formats.files import folder_in_place
from .language import captions, questions, referring_expression
from .render import render
from .scene import LAND_USES, sample_scene
from .video import EVENTS, clip_captions, event_scene, write_clip

# SkyEye-Synth's events under the ERA class names the CapERA release's video ids start with
ERA_CLASS = {"traffic_congestion": "TrafficCongestion", "car_racing": "CarRacing", "boating": "Boating",
             "harvesting": "Harvesting", "non-event": "NonEvent"}

# The real sets' image sides in pixels (docs/data.md); `tiny` and `demo` render smaller to stay fast.
NATIVE_SIZE = {"ucm_captions": 256, "sydney_captions": 500, "rsicd": 224, "capera": 256, "rsvqa_lr": 256,
               "rsvqa_hr": 512, "rsvg": 1024, "dior_rsvg": 800}


@dataclass(frozen=True)
class Scale:
    images: dict[str, int]  # images (clips for CapERA) per benchmark, all splits
    phili_images: int  # RSVQA-HR test set 2
    questions_per_image: int
    image_size: int | None  # None: the real sets' sizes
    # images of a scored split, where the split shares would leave too few to tell a model
    # from a baseline; the other splits share the rest
    scored_images: dict[str, dict[str, int]] = field(default_factory=dict)


# demo: every scored split holds at least 300 items, or the real split's size where that is
# smaller (UCM-Captions test: 210 images, Sydney-Captions test: 58), so a difference of about
# 7 points of accuracy is detectable. The captioning train splits are 1.5-2.2x what they
# were (Sydney at its real size, 613 images): on 242-400 train images each, the model learnt
# each scene's usual caption, not the image's counts
SCALES = {
    "tiny": Scale({"ucm_captions": 10, "sydney_captions": 10, "rsicd": 10, "capera": 10, "rsvqa_lr": 10,
                   "rsvqa_hr": 10, "rsvg": 10, "dior_rsvg": 12}, 3, 6, 64),
    "demo": Scale({"ucm_captions": 1000, "sydney_captions": 613, "rsicd": 1200, "capera": 700, "rsvqa_lr": 400,
                   "rsvqa_hr": 400, "rsvg": 370, "dior_rsvg": 900}, 100, 12, 128,
                  scored_images={"ucm_captions": {"test": 210}, "sydney_captions": {"test": 58},
                                 "rsicd": {"test": 300}, "capera": {"test": 300},
                                 # ~4.2 expressions per image: 75 images give 300+ items
                                 "rsvg": {"val": 75, "test": 75}}),
    "full": Scale({"ucm_captions": 2100, "sydney_captions": 613, "rsicd": 10921, "capera": 2864, "rsvqa_lr": 772,
                   "rsvqa_hr": 9567, "rsvg": 4239, "dior_rsvg": 17402}, 1092, 100, None),
}
# Split shares per benchmark, close to the real sets'.
SPLIT_SHARES = {
    "captions": (("train", 0.8), ("val", 0.1), ("test", 0.1)),
    "capera": (("train", 1473 / 2864), ("test", 1391 / 2864)),  # as released: 1,473 / 1,391 videos, no val
    "rsvqa_lr": (("train", 0.74), ("val", 0.13), ("test", 0.13)),
    "rsvqa_hr": (("train", 0.62), ("val", 0.11), ("test", 0.27)),
    "rsvg": (("train", 0.70), ("val", 0.14), ("test", 0.16)),
    "dior_rsvg": (("train", 0.704), ("val", 0.10), ("test", 0.196)),
}
SYDNEY_USES = ("residential", "airport", "meadow", "river", "beach", "industrial", "parking lot")
GROUNDING_USES = ("airport", "harbour", "industrial", "parking lot", "sports field", "residential", "river")
LR_TYPES = ("presence", "comp", "rural_urban", "count")
HR_TYPES = ("presence", "comp", "count", "area")


def split_sizes(bench: str, n: int, scale: Scale) -> tuple[tuple[str, int], ...]:
    """Images per split, in file order: the scale's fixed scored splits, the others by their shares."""
    shares = SPLIT_SHARES.get(bench, SPLIT_SHARES["captions"])
    fixed = scale.scored_images.get(bench, {})
    rest = n - sum(fixed.values())
    if rest < 0:
        raise ValueError(f"scale: {bench} has {n} images, fewer than its fixed splits {fixed}")
    free = [(name, share) for name, share in shares if name not in fixed]
    total = sum(share for _, share in free)
    sizes, edge, given = [], 0.0, 0
    for name, share in shares:
        if name in fixed:
            sizes.append((name, fixed[name]))
            continue
        edge += share / total
        count = round(edge * rest) - given
        given += count
        sizes.append((name, count))
    return tuple(sizes)


def split_of(i: int, sizes: tuple[tuple[str, int], ...]) -> str:
    edge = 0
    for name, count in sizes:
        edge += count
        if i < edge:
            return name
    return sizes[-1][0]


def _rng(seed: int, bench: str, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, BENCHMARKS.index(bench), i]))


def _size(scale: Scale, bench: str) -> int:
    return scale.image_size or NATIVE_SIZE[bench]


# ------------------------------------------------------------------ per-image work (runs in workers)
def _make_item(job: tuple) -> dict:
    """Render one image (or clip) and return the ground truth the layout files need."""
    bench, i, seed, size, out, extra = job
    rng = _rng(seed, bench, i)
    if bench == "capera":  # placed as ERA keeps its videos: <split>/<Event>/<Event>_NNN.mp4
        split, video_id = extra
        event = EVENTS[i % len(EVENTS)]
        scene, vel, direction = event_scene(event, rng)
        write_clip(out / split / ERA_CLASS[event] / video_id, scene, vel, size)
        # the release's captions are lower case without a final period
        caps = [c.strip().rstrip(".").lower() for c in clip_captions(event, scene, direction)]
        return {"video_id": video_id, "split": split, "captions": caps}
    if bench in ("ucm_captions", "sydney_captions", "rsicd"):
        uses = SYDNEY_USES if bench == "sydney_captions" else tuple(LAND_USES)
        scene = sample_scene(rng, land_use=uses[i % len(uses)])
        caps = captions(scene, rng)
        if bench == "rsicd":  # RSICD names files after their scene class
            fname = f"{scene.land_use.replace(' ', '')}_{i + 1}.jpg"
            render(scene, size).save(out / "RSICD_images" / fname, quality=92)
        else:
            fname = f"{i + 1}.tif"
            render(scene, size).save(out / "imgs" / fname, compression="tiff_lzw")
        return {"filename": fname, "captions": caps, "land_use": scene.land_use}
    if bench in ("rsvqa_lr", "rsvqa_hr"):
        style, types, _ = extra
        scene = sample_scene(rng, style=style)
        folder = "Images_LR" if bench == "rsvqa_lr" else "Data"
        render(scene, size).save(out / folder / f"{i}.tif", compression="tiff_lzw")
        return {"qas": questions(scene, rng, types, extra[2])}
    if bench in ("rsvg", "dior_rsvg"):
        scene = sample_scene(rng, land_use=GROUNDING_USES[i % len(GROUNDING_USES)])
        # Keep only objects that some expression singles out; the others are not drawn,
        # so every drawn object can be referred to (and detection answers are complete).
        described = [(o, referring_expression(o, scene, rng)) for o in scene.objects]
        scene.objects = [o for o, e in described if e is not None]
        described = [(o, e) for o, e in described if e is not None]
        render(scene, size).save(out / ("images" if bench == "rsvg" else "JPEGImages") / f"{i + 1:05d}.jpg",
                                 quality=92)
        objs = [{"name": o.category, "box": [int(v * size) for v in o.box], "description": e}
                for o, e in described]
        return {"stem": f"{i + 1:05d}", "size": size, "objects": objs}
    raise ValueError(bench)


# ------------------------------------------------------------------ layout writers
def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=True), encoding="utf-8")


def _karpathy(bench: str, items: list[dict], out: Path, sizes) -> None:
    images, sentid = [], 0
    for i, it in enumerate(items):
        sents = []
        for raw in it["captions"]:
            tokens = raw.replace(".", " ").replace(",", " ").split()
            sents.append({"tokens": tokens, "raw": raw, "imgid": i, "sentid": sentid})
            sentid += 1
        images.append({"filename": it["filename"], "imgid": i, "sentids": [s["sentid"] for s in sents],
                       "split": split_of(i, sizes), "sentences": sents})
    name = {"ucm_captions": "ucm", "sydney_captions": "sydney", "rsicd": "rsicd"}[bench]
    _dump(out / ("dataset_rsicd.json" if bench == "rsicd" else "dataset.json"), {"images": images, "dataset": name})


def _capera(items: list[dict], out: Path) -> None:
    """CapERA_DATASET_<split>.json as released: entries by video_id, indented by 3, no space
    after a colon, CRLF line endings, no final newline (the real files are exactly this dump)."""
    for split in ("train", "test"):
        entries = [{"video_id": it["video_id"], "annotation": {"English_caption": it["captions"]}}
                   for it in sorted(items, key=lambda it: it["video_id"]) if it["split"] == split]
        text = json.dumps({"ERA_caption": entries}, indent=3, separators=(",", ":"), ensure_ascii=True)
        (out / f"CapERA_DATASET_{split}.json").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))


def _rsvg(items: list[dict], out: Path, sizes) -> None:
    """rsvg_<split>.pth as the authors' loader reads them: a torch.save'd list of
    (img_file, [x1, y1, x2, y2] integer pixels, phrase, _) per referring expression. The
    fourth element is undocumented and discarded by that loader: None here."""
    import torch

    splits: dict[str, list[tuple]] = {"train": [], "val": [], "test": []}
    for i, it in enumerate(sorted(items, key=lambda it: it["stem"])):
        splits[split_of(i, sizes)] += [(f"{it['stem']}.jpg", [int(v) for v in o["box"]], o["description"], None)
                                       for o in it["objects"]]
    for split, rows in splits.items():
        # torch's older, non-zip format: the zip one writes a random serialization id, and the
        # same seed must give the same bytes; torch.load reads both
        torch.save(rows, out / f"rsvg_{split}.pth", _use_new_zipfile_serialization=False)


def _rsvqa(bench: str, items_by_split: dict[str, list[tuple[int, dict]]], out: Path) -> None:
    """LR is written with full objects in the split files, HR with id/active stubs and the
    text in all_questions.json / all_answers.json: both variants circulate."""
    prefix = "LR_split" if bench == "rsvqa_lr" else "USGS_split"
    full_objects = bench == "rsvqa_lr"
    all_q, all_a, qid, aid = [], [], 0, 0
    for split, items in items_by_split.items():
        imgs, qs, ans = [], [], []
        for img_id, it in items:
            qids = []
            for k, (q, a, qtype) in enumerate(it["qas"]):
                # about 1 question in 40 is inactive, as in the real files: readers must count, not use, them
                active = (img_id * 7 + k) % 40 != 3
                qs.append({"id": qid, "date_added": 1.0, "img_id": img_id, "people_id": 0, "type": qtype,
                           "question": q, "answers_ids": [aid], "active": active})
                ans.append({"id": aid, "date_added": 1.0, "question_id": qid, "people_id": 0,
                            "answer": a, "active": True})
                qids.append(qid)
                qid, aid = qid + 1, aid + 1
            imgs.append({"id": img_id, "people_id": 0, "original_name": f"{img_id}.tif", "questions_ids": qids,
                         "active": True})
        all_q += qs
        all_a += ans
        if not full_objects:
            qs = [{"id": q["id"], "active": q["active"]} for q in qs]
            ans = [{"id": a["id"], "active": a["active"]} for a in ans]
        _dump(out / f"{prefix}_{split}_images.json", {"images": imgs})
        _dump(out / f"{prefix}_{split}_questions.json", {"questions": qs})
        _dump(out / f"{prefix}_{split}_answers.json", {"answers": ans})
    if not full_objects:
        _dump(out / "all_questions.json", {"questions": all_q})
        _dump(out / "all_answers.json", {"answers": all_a})


def _voc(bench: str, items: list[dict], out: Path, sizes) -> None:
    """DIOR-RSVG: Pascal-VOC XML per image; split files index the running object count over
    the XML files sorted by name."""
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    running = 0
    for i, it in enumerate(sorted(items, key=lambda it: it["stem"])):
        objs = "".join(
            f"\n  <object>\n    <name>{o['name'].replace(' ', '')}</name>\n    <pose>Unspecified</pose>\n"
            f"    <bndbox>\n      <xmin>{o['box'][0]}</xmin>\n      <ymin>{o['box'][1]}</ymin>\n"
            f"      <xmax>{o['box'][2]}</xmax>\n      <ymax>{o['box'][3]}</ymax>\n    </bndbox>\n"
            f"    <description>{escape(o['description'])}</description>\n  </object>" for o in it["objects"])
        xml = (f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<annotation>\n'
               f"  <filename>{it['stem']}.jpg</filename>\n  <source>\n    <database>SkyEye-Synth</database>\n"
               f"  </source>\n  <size>\n    <width>{it['size']}</width>\n    <height>{it['size']}</height>\n"
               f"    <depth>3</depth>\n  </size>\n  <segmented>0</segmented>{objs}\n</annotation>")
        (out / "Annotations" / f"{it['stem']}.xml").write_text(xml, encoding="utf-8")
        split = split_of(i, sizes)
        splits[split] += list(range(running, running + len(it["objects"])))
        running += len(it["objects"])
    for split, idx in splits.items():
        (out / f"{split}.txt").write_text("".join(f"{k}\n" for k in idx), encoding="utf-8")


# ------------------------------------------------------------------ driver
FOLDERS = {"ucm_captions": ["imgs"], "sydney_captions": ["imgs"], "rsicd": ["RSICD_images"],
           "capera": [f"{split}/{event}" for split in ("train", "test") for event in ERA_CLASS.values()],
           "rsvqa_lr": ["Images_LR"], "rsvqa_hr": ["Data"], "rsvg": ["images"],
           "dior_rsvg": ["JPEGImages", "Annotations"]}


def _jobs(bench: str, scale: Scale, seed: int, out: Path) -> list[tuple]:
    size = _size(scale, bench)
    n = scale.images[bench]
    if bench == "rsvqa_lr":
        return [(bench, i, seed, size, out, ("default", LR_TYPES, scale.questions_per_image)) for i in range(n)]
    if bench == "rsvqa_hr":  # test set 2 (Philadelphia) is another city: another style
        return [(bench, i, seed, size, out, ("phili" if i >= n else "default", HR_TYPES, scale.questions_per_image))
                for i in range(n + scale.phili_images)]
    if bench == "capera":  # ERA numbers each split's videos of an event from 001: ids recur across splits
        sizes, numbered = split_sizes(bench, n, scale), Counter()
        jobs = []
        for i in range(n):
            split, era = split_of(i, sizes), ERA_CLASS[EVENTS[i % len(EVENTS)]]
            numbered[split, era] += 1
            jobs.append((bench, i, seed, size, out, (split, f"{era}_{numbered[split, era]:03d}.mp4")))
        return jobs
    return [(bench, i, seed, size, out, None) for i in range(n)]


def synthesize(out: Path, scale: str = "demo", seed: int = 0, workers: int | None = None,
               benchmarks: tuple[str, ...] = BENCHMARKS, progress: bool = True) -> dict[str, dict[str, int]]:
    """Write SkyEye-Synth under `out` (one folder per benchmark). Returns images per split."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    unknown = set(benchmarks) - set(BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; known: {BENCHMARKS}")
    sc = SCALES[scale]
    with folder_in_place(Path(out)) as tmp:
        jobs: list[tuple] = []
        for bench in benchmarks:
            for sub in FOLDERS[bench]:
                (tmp / bench / sub).mkdir(parents=True, exist_ok=True)
            jobs += _jobs(bench, sc, seed, tmp / bench)
        workers = workers or min(os.cpu_count() or 1, 8)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(tqdm(pool.map(_make_item, jobs, chunksize=16), total=len(jobs),
                                    desc=f"synth {scale}", disable=not progress, unit="img"))
        else:
            results = [_make_item(j) for j in tqdm(jobs, desc=f"synth {scale}", disable=not progress, unit="img")]
        summary = _write_layouts(tmp, jobs, results, sc)
        (tmp / "SKYEYE_SYNTH.md").write_text(
            f"# SkyEye-Synth (synthetic)\n\nProcedural stand-in for the 8 benchmarks, scale `{scale}`, seed {seed}.\n"
            "Not real imagery: see the project README.\n", encoding="utf-8")
    return summary


def _write_layouts(root: Path, jobs: list[tuple], results: list[dict], sc: Scale) -> dict[str, dict[str, int]]:
    by_bench: dict[str, list[tuple[tuple, dict]]] = {}
    for job, res in zip(jobs, results, strict=True):
        by_bench.setdefault(job[0], []).append((job, res))
    summary: dict[str, dict[str, int]] = {}
    for bench, pairs in by_bench.items():
        items = [r for _, r in pairs]
        out = root / bench
        if bench in ("rsvqa_lr", "rsvqa_hr"):
            n = sc.images[bench]
            sizes = split_sizes(bench, n, sc)
            by_split: dict[str, list[tuple[int, dict]]] = {}
            for (_, i, *_rest), it in pairs:
                split = "test_phili" if i >= n else split_of(i, sizes)
                by_split.setdefault(split, []).append((i, it))
            _rsvqa(bench, by_split, out)
            summary[bench] = {s: len(v) for s, v in by_split.items()}
            continue
        sizes = split_sizes(bench, len(items), sc)
        if bench in ("ucm_captions", "sydney_captions", "rsicd"):
            _karpathy(bench, items, out, sizes)
        elif bench == "capera":
            _capera(items, out)
        elif bench == "rsvg":
            _rsvg(items, out, sizes)
        else:
            _voc(bench, items, out, sizes)
        summary[bench] = {name: count for name, count in sizes if count}
    return summary

