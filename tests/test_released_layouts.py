"""CapERA and RSVG as their authors released them: verbatim excerpts of the CapERA files and
RSVG split files made from the authors' loader (tests/data/capera, tests/data/rsvg, with
their sources), a split file that would run code, and `skyeye data inspect` on both."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from skyeye.cli import app
from skyeye.data.capera import event_words
from skyeye.data.readers import detect_benchmark, read_benchmark
from skyeye.data.records import BOX_CLIPPED, DataFormatError
from skyeye.formats.boxes import box_text

DATA = Path(__file__).resolve().parent / "data"
# the videos the CapERA excerpts name, where ERA keeps them; TrafficCongestion_052 of train is left out
CAPERA_VIDEOS = {"Train": ["Baseball/Baseball_001.mp4", "Baseball/Baseball_002.mp4", "NonEvent/NonEvent_001.mp4",
                           "TrafficCollision/TrafficCollision_001.mp4"],
                 "test": ["Baseball/Baseball_001.mp4", "Baseball/Baseball_002.mp4",
                          "more/TrafficCongestion/TrafficCongestion_050.mp4"]}  # any depth


def capera_release(root: Path, videos: Path | None = None) -> Path:
    """The verbatim excerpts, with stand-in videos (the reader does not decode them) under
    `videos` (default: the annotation folder), each file's bytes naming its split."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("CapERA_DATASET_train.json", "CapERA_DATASET_test.json"):
        shutil.copyfile(DATA / "capera" / name, root / name)
    for split, files in CAPERA_VIDEOS.items():
        for rel in files:
            path = (videos or root) / split / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"{split}/{rel}".encode())
    return root


def rsvg_release(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        shutil.copyfile(DATA / "rsvg" / f"rsvg_{split}.pth", root / f"rsvg_{split}.pth")
    for stem in ("00001", "00002", "00003"):  # 00404.jpg, named by a test pair, is missing
        (root / "images").mkdir(exist_ok=True)
        Image.new("RGB", (800, 600), (40, 90, 60)).save(root / "images" / f"{stem}.jpg")
    return root


# ---------- CapERA ----------

def test_capera_excerpts_are_the_release_bytes():
    """The committed excerpts kept what makes the release the release: CRLF, no final newline,
    the exact dump format, lower-case captions without a final period."""
    for name, ids in (("train", 5), ("test", 3)):
        raw = (DATA / "capera" / f"CapERA_DATASET_{name}.json").read_bytes()
        assert raw.count(b"\n") == raw.count(b"\r\n") > 0 and raw.endswith(b"}") and raw.startswith(b"{\r\n")
        doc = json.loads(raw)
        assert json.dumps(doc, indent=3, separators=(",", ":")).replace("\n", "\r\n").encode() == raw
        entries = doc["ERA_caption"]
        assert len(entries) == ids and all(len(e["annotation"]["English_caption"]) == 5 for e in entries)
        caps = [c for e in entries for c in e["annotation"]["English_caption"]]
        assert all(c == c.lower() and not c.endswith(".") for c in caps)


def test_capera_train_and_test_clips_with_one_video_id_are_kept_apart(tmp_path):
    samples, report = read_benchmark("capera", capera_release(tmp_path / "capera"))
    by_key = {(s.split, s.id): s for s in samples}
    train, test = by_key["train", "Baseball_001"], by_key["test", "Baseball_001"]
    assert train.image != test.image
    assert train.image.read_bytes() == b"Train/Baseball/Baseball_001.mp4"
    assert test.image.read_bytes() == b"test/Baseball/Baseball_001.mp4"
    # each split's own captions, verbatim from its file
    assert train.captions[0] == ("baseball field with a large amphitheater and a collection of buildings "
                                 "and parking lots surrounded by trees")
    assert test.captions[0] == "people playing in the evening on a baseball field surrounded by parking"
    assert [s.split for s in samples] == ["train"] * 4 + ["test"] * 3  # by split, then file order
    assert all(s.is_video and len(s.captions) == 5 for s in samples)
    assert by_key["test", "TrafficCongestion_050"].image.parent.name == "TrafficCongestion"  # found at depth 3


def test_capera_event_is_the_video_id_prefix(tmp_path):
    samples, _ = read_benchmark("capera", capera_release(tmp_path / "capera"), ["train"])
    assert {s.id: s.scene_class for s in samples} == {
        "Baseball_001": "Baseball", "Baseball_002": "Baseball", "NonEvent_001": "NonEvent",
        "TrafficCollision_001": "TrafficCollision"}
    assert [event_words(e) for e in ("TrafficCollision", "NonEvent", "Baseball", "traffic_congestion")] == [
        "traffic collision", "non-event", "baseball", "traffic congestion"]


def test_capera_missing_video_is_counted_and_named_not_fatal(tmp_path):
    samples, report = read_benchmark("capera", capera_release(tmp_path / "capera"))
    assert report.kept == {"train": 4, "test": 3}
    assert report.skipped == {"missing video file": 1} and report.skipped_in == {"train": 1}
    assert report.examples["missing video file"] == [
        "train/TrafficCongestion_052.mp4 (CapERA_DATASET_train.json ERA_caption[4])"]
    assert "TrafficCongestion_052.mp4" in report.summary()
    assert ("train", "TrafficCongestion_052") not in {(s.split, s.id) for s in samples}


def test_capera_videos_in_a_folder_the_user_names(tmp_path):
    root = capera_release(tmp_path / "annotations", videos=tmp_path / "ERA")
    assert not (root / "Train").exists()
    samples, report = read_benchmark("capera", root, media=tmp_path / "ERA")
    assert report.kept == {"train": 4, "test": 3}
    assert all(tmp_path / "ERA" in s.image.parents for s in samples)
    _, without = read_benchmark("capera", root)  # not under the annotation folder: all missing, counted
    assert not +without.kept and without.skipped_in == {"train": 5, "test": 3}
    with pytest.raises(ValueError, match="CapERA only"):
        read_benchmark("rsvg", rsvg_release(tmp_path / "rsvg"), media=tmp_path / "ERA")


def test_capera_has_no_val_file_and_bad_rows_name_file_and_field(tmp_path):
    root = capera_release(tmp_path / "capera")
    with pytest.raises(FileNotFoundError, match="CapERA_DATASET_val.json"):
        read_benchmark("capera", root, ["val"])  # the builder then holds part of train out
    doc = json.loads((root / "CapERA_DATASET_test.json").read_bytes())
    doc["ERA_caption"][1]["video_id"] = "Baseball.mp4"
    (root / "CapERA_DATASET_test.json").write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"CapERA_DATASET_test\.json: field 'ERA_caption\[1\]\.video_id'"):
        read_benchmark("capera", root, ["test"])
    doc["ERA_caption"][1]["video_id"] = "Baseball_001.mp4"  # twice in one split file
    (root / "CapERA_DATASET_test.json").write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="duplicate video_id 'Baseball_001.mp4'"):
        read_benchmark("capera", root, ["test"])


def test_capera_one_video_twice_in_a_split_is_ambiguous(tmp_path):
    root = capera_release(tmp_path / "capera")
    (root / "test" / "copy").mkdir()
    shutil.copyfile(root / "test" / "Baseball" / "Baseball_002.mp4", root / "test" / "copy" / "Baseball_002.mp4")
    with pytest.raises(DataFormatError, match="Baseball_002.mp4 is also at"):
        read_benchmark("capera", root, ["test"])


# ---------- RSVG ----------

def test_rsvg_boxes_are_pixels_x1y1x2y2_on_the_image(tmp_path):
    samples, report = read_benchmark("rsvg", rsvg_release(tmp_path / "rsvg"))
    train = [s for s in samples if s.split == "train"]
    tank = train[0]
    assert (tank.id, tank.expression, tank.box, tank.image_size) == (
        "00001_0", "the storage tank at the top left", (100.0, 200.0, 300.0, 260.0), (800, 600))
    assert tank.image == tmp_path / "rsvg" / "images" / "00001.jpg" and tank.category == ""
    # on the 0-100 grid of an 800 x 600 image, as the builder writes it: x by the width, y by the height
    assert box_text(tank.box, *tank.image_size) == "{<12><33><37><43>}"
    assert train[1].expression.startswith("find a water tower") and train[1].image == tank.image
    # a numpy box 1 px past the 800 px width: clipped to the edge and counted
    assert train[2].box == (0.0, 0.0, 800.0, 50.0) and report.clipped == {BOX_CLIPPED: 1}


def test_rsvg_splits_and_skips(tmp_path):
    samples, report = read_benchmark("rsvg", rsvg_release(tmp_path / "rsvg"))
    assert report.kept == {"train": 3, "val": 1, "test": 1}
    assert report.skipped == {"missing image file": 1, "degenerate box": 1}
    assert report.skipped_in == {"test": 2}
    assert report.examples["missing image file"] == ["images/00404.jpg (rsvg_test.pth[1])"]
    val, _ = read_benchmark("rsvg", tmp_path / "rsvg", ["val"])
    assert [(s.split, s.box) for s in val] == [("val", (10.0, 10.0, 50.0, 50.0))]


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): a split file that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_rsvg_split_file_that_would_run_code_is_refused_not_run(tmp_path, how):
    root = rsvg_release(tmp_path / "rsvg")
    marker = tmp_path / "marker"
    rows = [("00001.jpg", [1, 2, 30, 40], "a ship", _WritesMarker(marker))]
    if how == "torch.save":
        torch.save(rows, root / "rsvg_train.pth")
    else:
        with open(root / "rsvg_train.pth", "wb") as f:
            pickle.dump(rows, f, protocol=2)  # torch.save's protocol: refused for the call, not the opcodes
    with pytest.raises(DataFormatError, match=r"rsvg_train\.pth: field '\(whole file\)': refused.*GLOBAL io\.open"):
        read_benchmark("rsvg", root, ["train"])
    assert not marker.exists()
    # the file is what it claims: an unrestricted load would have run it
    with open(root / "rsvg_train.pth", "rb") as f:
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert marker.exists()


def test_rsvg_malformed_tuple_names_file_and_field(tmp_path):
    root = rsvg_release(tmp_path / "rsvg")
    torch.save([("00001.jpg", [1.5, 2, 30, 40], "a ship", 0)], root / "rsvg_val.pth")
    with pytest.raises(DataFormatError, match=r"rsvg_val\.pth: field '\[0\]\[1\] bbox': expected integer pixels"):
        read_benchmark("rsvg", root, ["val"])
    torch.save([("00001.jpg", [1, 2, 30, 40], "a ship")], root / "rsvg_val.pth")
    with pytest.raises(DataFormatError, match=r"rsvg_val\.pth: field '\[0\]'"):
        read_benchmark("rsvg", root, ["val"])


# ---------- detection and inspect ----------

def test_detect_the_released_layouts_and_the_old_synthetic_ones(tmp_path):
    from tests.test_readers import capera_fixture, voc_fixture
    assert detect_benchmark(capera_release(tmp_path / "a")) == "capera"
    assert detect_benchmark(rsvg_release(tmp_path / "b")) == "rsvg"
    # SkyEye-Synth's layouts up to data version 038d42f4: still read
    assert detect_benchmark(capera_fixture(tmp_path / "c")) == "capera"
    assert detect_benchmark(voc_fixture(tmp_path / "rsvg")) == "rsvg"
    assert detect_benchmark(voc_fixture(tmp_path / "DIOR")) == "dior_rsvg"  # any other VOC folder


def test_inspect_prints_kept_and_skipped_per_split(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "inspect", str(capera_release(tmp_path / "capera"))])
    assert r.exit_code == 0, r.output
    assert "train: kept 4, skipped 1" in r.output and "test: kept 3, skipped 0" in r.output
    r = runner.invoke(app, ["data", "inspect", str(rsvg_release(tmp_path / "rsvg"))])
    assert r.exit_code == 0, r.output
    for line in ("train: kept 3, skipped 0", "val: kept 1, skipped 0", "test: kept 1, skipped 2"):
        assert line in r.output
    r = runner.invoke(app, ["data", "inspect", str(capera_release(tmp_path / "ann", tmp_path / "ERA")),
                            "--media", str(tmp_path / "ERA")])
    assert r.exit_code == 0 and "train: kept 4, skipped 1" in r.output
