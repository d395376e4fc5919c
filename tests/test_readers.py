"""Tests of skyeye.data readers: tiny fixtures written in each benchmark's native layout,
plus the real DIOR-RSVG split files and annotation in tests/data/dior_rsvg. CapERA and RSVG
as released: tests/test_released_layouts.py; here their SkyEye-Synth layouts of data
versions up to 038d42f4, still read."""
from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from skyeye.data.readers import detect_benchmark, read_benchmark
from skyeye.data.records import CaptionSample, DataFormatError, GroundingSample, VQASample
from skyeye.data.voc import load_split_indices, parse_annotation
from skyeye.formats.benchmarks import BENCHMARKS, SCORED_SPLITS, SPLITS

# ---------- fixture writers (the published layouts) ----------

def write_image(path: Path, size: tuple[int, int] = (16, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 60)).save(path)


def write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def write_karpathy(root: Path, ann: str, img_dir: str, dataset: str, rows: list[tuple]) -> None:
    """rows: (imgid, filename, split, [raw captions]); raw None -> tokens only."""
    images, sentid = [], 0
    for imgid, filename, split, raws in rows:
        sentences = []
        for raw in raws:
            s = {"tokens": (raw or "tokens only here").strip(" .").split(), "imgid": imgid, "sentid": sentid}
            if raw is not None:
                s["raw"] = raw
            sentences.append(s)
            sentid += 1
        images.append({"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
                       "sentids": [s["sentid"] for s in sentences]})
        write_image(root / img_dir / filename)
    write_json(root / ann, {"images": images, "dataset": dataset})


def ucm_fixture(root: Path) -> Path:
    write_karpathy(root, "dataset.json", "imgs", "ucm", [
        (7, "7.tif", "test", [" a runway with planes . ", "two planes ."]),
        (2, "2.tif", "train", ["a farmland ."]),
        (5, "5.tif", "test", [None, "green trees ."]),
        (3, "3.tif", "val", ["a river ."]),
    ])
    return root


# RSVQA logical content: images (id, active); questions (id, img, type, text, answers_ids, active);
# answers (id, question_id, text, active). Ids deliberately unlike list positions.
RSVQA_TEST = {
    "images": [(1, True), (2, True), (3, False)],
    "questions": [
        (10, 1, "presence", "Is there a road?", [100], True),
        (11, 1, "comp", "Are there more buildings than roads?", [101, 102], True),  # 101 inactive
        (12, 2, "rural_urban", "Is it a rural or an urban area?", [103], False),
        (13, 3, "presence", "Is there water?", [104], True),  # image 3 inactive
        (14, 2, "count", "How many buildings are there?", [105], True),  # only answer inactive
        (15, 2, "presence", "Is there a farmland?", [999], True),  # answer id absent
        (16, 2, "count", "How many roads are there?", [106], True),
    ],
    "answers": [(100, 10, "yes", True), (101, 11, "yes", False), (102, 11, "no", True), (103, 12, "rural", True),
                (104, 13, "no", True), (105, 14, "4", False), (106, 16, "3", True)],
}
RSVQA_TRAIN = {"images": [(40, True)], "questions": [(50, 40, "presence", "Is there a road?", [60], True)],
               "answers": [(60, 50, "no", True)]}


def _full_rows(spec: dict) -> dict[str, list[dict]]:
    return {
        "images": [{"id": i, "questions_ids": [q[0] for q in spec["questions"] if q[1] == i], "active": a,
                    "date_added": 0} for i, a in spec["images"]],
        "questions": [{"id": q, "img_id": i, "type": t, "question": text, "answers_ids": ans, "active": a,
                       "people_id": 0} for q, i, t, text, ans, a in spec["questions"]],
        "answers": [{"id": a, "question_id": q, "answer": text, "active": act, "people_id": 0}
                    for a, q, text, act in spec["answers"]],
    }


def rsvqa_fixture(root: Path, prefix: str, img_dir: str, splits: dict[str, dict], variant: str,
                  seed: int = 0) -> Path:
    """Variant "a": full objects per split; "b": split files hold {id, active}, text in all_*.json."""
    rng, everything = random.Random(seed), {"questions": [], "answers": []}
    for split, spec in splits.items():
        rows = _full_rows(spec)
        for kind, items in rows.items():
            items = list(items)
            rng.shuffle(items)  # lists in arbitrary order must still join by id
            if variant == "b" and kind != "images":
                everything[kind].extend(items)
                items = [{"id": r["id"], "active": r["active"]} for r in items]
            write_json(root / f"{prefix}_split_{split}_{kind}.json", {kind: items})
        for image_id, _ in spec["images"]:
            write_image(root / img_dir / f"{image_id}.tif")
    if variant == "b":
        for kind, items in everything.items():
            rng.shuffle(items)
            write_json(root / f"all_{kind}.json", {kind: items})
    return root


def write_voc(path: Path, objects: list[tuple], filename: str | None = None, size=(800, 600)) -> None:
    """objects: (name, (xmin, ymin, xmax, ymax), description)."""
    parts = ["<annotation>"]
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, desc in objects:
        b = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
        parts.append(f"<object><name>{name}</name><bndbox>{b}</bndbox><description>{desc}</description></object>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts + ["</annotation>"]))


def voc_fixture(root: Path, splits: dict[str, list[int]] | None = None) -> Path:
    # written out of name order; sorted by name: 00002 (index 0), 00003 (1, 2, 3), 00010 (4, 5)
    write_voc(root / "Annotations" / "00010.xml", [("ship", (10, 20, 30, 40), "the ship on the left"),
                                                   ("ship", (50, 20, 70, 40), "the ship on the right")],
              filename="00010.jpg")
    write_voc(root / "Annotations" / "00002.xml", [("airport", (0, 0, 400, 300), "the airport")])
    write_voc(root / "Annotations" / "00003.xml", [("tennis", (1, 2, 3, 4), "a tennis court"),
                                                   ("tennis", (5.5, 6, 7, 8), " the second court "),
                                                   ("dam", (100, 100, 200, 150), "the dam at the bottom")])
    for stem in ("00002", "00003", "00010"):
        write_image(root / "JPEGImages" / f"{stem}.jpg")
    for split, idx in (splits or {"train": [5, 1], "val": [0, 4], "test": [3, 2]}).items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in idx))
    return root


def write_clip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def capera_fixture(root: Path) -> Path:
    """SkyEye-Synth's earlier CapERA layout (`captions.json`), data versions up to 038d42f4."""
    clips = [{"id": cid, "file": f"clips/{cid}.mp4", "event": ev, "split": sp,
              "captions": [f" {ev} caption {k} " for k in range(5)]}
             for cid, ev, sp in (("c2", "flood", "test"), ("c1", "fire", "train"), ("c0", "harvest", "test"))]
    for c in clips:
        write_clip(root / c["file"])
    write_json(root / "captions.json", {"dataset": "capera", "clips": clips})
    return root


# ---------- registry ----------

def test_registry_names_and_splits():
    assert BENCHMARKS == ("ucm_captions", "sydney_captions", "rsicd", "capera", "rsvqa_lr", "rsvqa_hr",
                          "rsvg", "dior_rsvg")
    assert SPLITS["rsvqa_hr"] == ("train", "val", "test", "test_phili")
    assert all(SPLITS[n] == ("train", "val", "test") for n in BENCHMARKS if n != "rsvqa_hr")
    assert SCORED_SPLITS == {**{n: ("test",) for n in BENCHMARKS}, "rsvqa_hr": ("test", "test_phili"),
                             "rsvg": ("val", "test")}


def test_unknown_benchmark_and_split(tmp_path):
    with pytest.raises(ValueError, match="dior_rsvg"):
        read_benchmark("coco", tmp_path)
    with pytest.raises(ValueError, match="test_phili"):
        read_benchmark("rsvqa_lr", ucm_fixture(tmp_path), splits=["test_phili"])


def test_detect_each_layout(tmp_path):
    made = {
        "ucm_captions": ucm_fixture(tmp_path / "a"),
        "rsvqa_lr": rsvqa_fixture(tmp_path / "b", "LR", "Images_LR", {"test": RSVQA_TEST}, "a"),
        "rsvqa_hr": rsvqa_fixture(tmp_path / "c", "USGS", "Data", {"test_phili": RSVQA_TEST}, "b"),
        "dior_rsvg": voc_fixture(tmp_path / "DIOR-RSVG"),
        "rsvg": voc_fixture(tmp_path / "rsvg"),  # SkyEye-Synth's VOC-layout RSVG folder until 038d42f4
        "capera": capera_fixture(tmp_path / "d"),
    }
    write_karpathy(tmp_path / "e", "dataset_rsicd.json", "RSICD_images", "rsicd", [(1, "airport_1.jpg", "test", ["x"])])
    made["rsicd"] = tmp_path / "e"
    write_karpathy(tmp_path / "f", "dataset.json", "imgs", "sydney", [(1, "1.tif", "test", ["x"])])
    made["sydney_captions"] = tmp_path / "f"
    write_karpathy(tmp_path / "sydney_captions", "dataset.json", "imgs", "", [(1, "1.tif", "test", ["x"])])
    assert {detect_benchmark(p): n for n, p in made.items()} == {n: n for n in made}
    assert detect_benchmark(tmp_path / "sydney_captions") == "sydney_captions"  # by folder name
    (tmp_path / "empty").mkdir()
    assert detect_benchmark(tmp_path / "empty") is None


# ---------- captions ----------

def test_ucm_captions_read(tmp_path, monkeypatch):
    ucm_fixture(tmp_path / "ucm")
    monkeypatch.chdir(tmp_path)
    samples, report = read_benchmark("ucm_captions", Path("ucm"))  # relative root -> absolute paths
    assert [(s.split, s.id) for s in samples] == [("train", "2"), ("val", "3"), ("test", "5"), ("test", "7")]
    s7 = samples[-1]
    assert isinstance(s7, CaptionSample) and s7.captions == ("a runway with planes .", "two planes .")
    assert s7.image == tmp_path / "ucm" / "imgs" / "7.tif" and s7.image.is_absolute()
    assert samples[2].captions == ("tokens only here", "green trees .")  # no raw -> joined tokens
    assert all(s.scene_class is None and not s.is_video for s in samples)
    assert report.kept == {"train": 1, "val": 1, "test": 2} and not report.skipped
    test_only, _ = read_benchmark("ucm_captions", Path("ucm"), splits=["test"])
    assert [s.id for s in test_only] == ["5", "7"]


def test_rsicd_scene_class_and_missing_image(tmp_path):
    write_karpathy(tmp_path, "dataset_rsicd.json", "RSICD_images", "rsicd", [
        (0, "denseresidential_12.jpg", "test", ["houses ."]), (1, "00042.jpg", "test", ["x ."]),
        (2, "bare_land_3.jpg", "test", ["sand ."]), (3, "gone_1.jpg", "test", ["y ."])])
    (tmp_path / "RSICD_images" / "gone_1.jpg").unlink()
    samples, report = read_benchmark("rsicd", tmp_path)
    assert [(s.id, s.scene_class) for s in samples] == [("0", "denseresidential"), ("1", None), ("2", "bare_land")]
    assert samples[0].image.parent.name == "RSICD_images"
    assert report.skipped == {"missing image file": 1} and report.skipped_in == {"test": 1}
    # what `skyeye data inspect` prints per split, every split read
    assert report.by_split() == ["train: kept 0, skipped 0", "val: kept 0, skipped 0", "test: kept 3, skipped 1"]


def test_capera_legacy_synth_clips(tmp_path):
    samples, report = read_benchmark("capera", capera_fixture(tmp_path), splits=["test"])
    assert [(s.id, s.scene_class) for s in samples] == [("c2", "flood"), ("c0", "harvest")]
    assert all(s.is_video and s.image.suffix == ".mp4" and s.image.is_file() for s in samples)
    assert samples[0].captions == tuple(f"flood caption {k}" for k in range(5))
    with av.open(str(samples[0].image)) as clip:  # the fixture is a real, decodable clip
        assert sum(1 for _ in clip.decode(video=0)) == 4
    assert report.kept == {"test": 2}


# ---------- RSVQA ----------

def _vqa_view(samples):
    return [(s.split, s.id, s.image.name, s.question, s.answer, s.question_type) for s in samples]


def test_rsvqa_lr_join_by_id_and_skips(tmp_path):
    root = rsvqa_fixture(tmp_path, "LR", "Images_LR", {"train": RSVQA_TRAIN, "test": RSVQA_TEST}, "a")
    samples, report = read_benchmark("rsvqa_lr", root)
    assert all(isinstance(s, VQASample) for s in samples)
    assert _vqa_view(samples) == [
        ("train", "50", "40.tif", "Is there a road?", "no", "presence"),
        ("test", "10", "1.tif", "Is there a road?", "yes", "presence"),
        ("test", "11", "1.tif", "Are there more buildings than roads?", "no", "comp"),  # first *active* answer
        ("test", "16", "2.tif", "How many roads are there?", "3", "count"),
    ]
    assert samples[1].image == root / "Images_LR" / "1.tif"
    assert report.kept == {"train": 1, "test": 3}
    assert report.skipped == {"inactive image": 1, "inactive question": 1, "inactive answer": 2,
                              "question of an inactive image": 1, "question without an active answer": 2}
    assert sum(report.skipped_in.values()) == sum(report.skipped.values())  # every skip is in its split


@pytest.mark.parametrize("benchmark,prefix,img_dir,split", [("rsvqa_lr", "LR", "Images_LR", "test"),
                                                          ("rsvqa_hr", "USGS", "Data", "test_phili")])
def test_rsvqa_variants_give_identical_samples(tmp_path, benchmark, prefix, img_dir, split):
    splits = {"train": RSVQA_TRAIN, split: RSVQA_TEST}
    a = rsvqa_fixture(tmp_path / "a", prefix, img_dir, splits, "a", seed=1)
    b = rsvqa_fixture(tmp_path / "b", prefix, img_dir, splits, "b", seed=2)
    assert "question" not in json.loads((b / f"{prefix}_split_{split}_questions.json").read_text())["questions"][0]
    (sa, ra), (sb, rb) = read_benchmark(benchmark, a), read_benchmark(benchmark, b)
    assert _vqa_view(sa) == _vqa_view(sb) and len(sa) == 4
    assert ra.skipped == rb.skipped and ra.kept == rb.kept == {"train": 1, split: 3}
    only, _ = read_benchmark(benchmark, b, splits=[split])
    assert [s.id for s in only] == ["10", "11", "16"]


def test_rsvqa_variant_b_split_file_active_flag_wins(tmp_path):
    root = rsvqa_fixture(tmp_path, "LR", "Images_LR", {"test": RSVQA_TEST}, "b")
    path = root / "LR_split_test_questions.json"
    doc = json.loads(path.read_text())
    for q in doc["questions"]:
        if q["id"] == 10:
            q["active"] = False  # all_questions.json still says active: the split's own view decides
    write_json(path, doc)
    samples, report = read_benchmark("rsvqa_lr", root)
    assert [s.id for s in samples] == ["11", "16"] and report.skipped["inactive question"] == 2


def test_rsvqa_variant_b_without_all_file_names_field(tmp_path):
    root = rsvqa_fixture(tmp_path, "LR", "Images_LR", {"test": RSVQA_TEST}, "b")
    (root / "all_questions.json").unlink()
    with pytest.raises(DataFormatError) as err:
        read_benchmark("rsvqa_lr", root)
    assert "LR_split_test_questions.json" in str(err.value) and ".img_id" in err.value.field


def test_rsvqa_missing_split_file_is_an_error(tmp_path):
    root = rsvqa_fixture(tmp_path, "USGS", "Data", {"test": RSVQA_TEST}, "a")
    with pytest.raises(FileNotFoundError, match="USGS_split_test_phili_images.json"):
        read_benchmark("rsvqa_hr", root, splits=["test_phili"])
    (root / "USGS_split_test_answers.json").unlink()
    with pytest.raises(DataFormatError, match="USGS_split_test_answers.json"):
        read_benchmark("rsvqa_hr", root)


# ---------- DIOR-RSVG / RSVG ----------

def test_voc_running_index_over_sorted_files(tmp_path):
    root = voc_fixture(tmp_path / "dior_rsvg")
    samples, report = read_benchmark("dior_rsvg", root)
    assert [(s.split, s.id) for s in samples] == [
        ("train", "00003_0"), ("train", "00010_1"), ("val", "00002_0"), ("val", "00010_0"),
        ("test", "00003_1"), ("test", "00003_2")]
    s = samples[4]
    assert isinstance(s, GroundingSample)
    assert (s.expression, s.box, s.image_size, s.category) == ("the second court", (5.5, 6, 7, 8), (800, 600), "tennis")
    assert s.image == root / "JPEGImages" / "00003.jpg"  # no <filename>: xml stem + .jpg
    assert report.kept == {"train": 2, "val": 2, "test": 2} and not report.skipped
    test_only, _ = read_benchmark("dior_rsvg", root, splits=["test"])
    assert [x.id for x in test_only] == ["00003_1", "00003_2"]


def test_voc_unlisted_objects_are_reported(tmp_path):
    _, report = read_benchmark("rsvg", voc_fixture(tmp_path, {"train": [0], "val": [1], "test": [2]}))
    assert report.skipped == {"object in no split file": 3}


@pytest.mark.parametrize("splits,file,problem", [
    ({"train": [0, 1], "val": [6], "test": [2]}, "val.txt", "out of range"),
    ({"train": [0, 1], "val": [2], "test": [1]}, "test.txt", "also listed in train.txt"),
    ({"train": [0, 1], "val": ["x2"], "test": [2]}, "val.txt", "not an integer"),
])
def test_voc_bad_split_files(tmp_path, splits, file, problem):
    root = voc_fixture(tmp_path, splits)
    with pytest.raises(DataFormatError, match=problem) as err:
        read_benchmark("dior_rsvg", root)
    assert err.value.path.name == file


def test_voc_bndbox_not_a_number(tmp_path):
    root = voc_fixture(tmp_path)
    write_voc(root / "Annotations" / "00003.xml", [("dam", (1, "ten", 3, 4), "x")])
    with pytest.raises(DataFormatError, match="ten") as err:
        read_benchmark("dior_rsvg", root)
    assert err.value.path.name == "00003.xml" and err.value.field == "object[0]/bndbox/ymin"


def _real_dior() -> Path:
    return Path(__file__).resolve().parent / "data" / "dior_rsvg"  # the release's split files, committed


def test_real_dior_rsvg_split_files():
    folder = _real_dior()
    splits = load_split_indices(folder, n_objects=38320)
    assert {k: len(v) for k, v in splits.items()} == {"train": 26991, "val": 3829, "test": 7500}
    assert sorted(i for v in splits.values() for i in v) == list(range(38320))  # disjoint and complete
    with pytest.raises(DataFormatError, match="out of range"):
        load_split_indices(folder, n_objects=38319)


def test_real_dior_rsvg_annotation():
    ann = parse_annotation(_real_dior() / "00001.xml")
    assert ann.filename == "00001.jpg" and ann.size == (800, 800) and len(ann.objects) == 1
    obj = ann.objects[0]
    assert (obj.name, obj.box) == ("golffield", (133, 237, 684, 672))
    assert obj.description == "A green and brown golf field"


# ---------- malformed input ----------

def test_bad_json_names_file(tmp_path):
    (tmp_path / "dataset_rsicd.json").write_text('{"images": [')
    with pytest.raises(DataFormatError, match="dataset_rsicd.json"):
        read_benchmark("rsicd", tmp_path)


def test_missing_field_names_file_and_field(tmp_path):
    ucm_fixture(tmp_path)
    doc = json.loads((tmp_path / "dataset.json").read_text())
    del doc["images"][2]["filename"]
    write_json(tmp_path / "dataset.json", doc)
    with pytest.raises(DataFormatError) as err:
        read_benchmark("ucm_captions", tmp_path)
    assert err.value.path.name == "dataset.json" and err.value.field == "images[2].filename"
    assert "dataset.json" in str(err.value) and "images[2].filename" in str(err.value)


def test_capera_missing_event(tmp_path):
    root = capera_fixture(tmp_path)
    doc = json.loads((root / "captions.json").read_text())
    del doc["clips"][1]["event"]
    write_json(root / "captions.json", doc)
    with pytest.raises(DataFormatError, match=r"clips\[1\]\.event"):
        read_benchmark("capera", root)
