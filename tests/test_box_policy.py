"""Annotation boxes that leave their image: a box over the edge by at most the tolerance is
clipped and counted; one far outside (a DIOR XML whose xmax is five times the image width)
is skipped, counted with the file and field, and shown in the data card, never clamped
onto the edge and trained on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from skyeye.config import LeakageConfig
from skyeye.data.instructions import build
from skyeye.data.readers import read_benchmark
from skyeye.data.records import BOX_CLIPPED, BOX_OUTSIDE, BOX_POLICY, fit_box
from skyeye.formats.boxes import parse_boxes
from tests.test_readers import write_image, write_voc

W, H = 800, 600
BAD = "Annotations/00002.xml object[1]/bndbox: xmax=4000 > width=800"  # 5 x the width
NEAR = "Annotations/00002.xml object[2]/bndbox: ymin=-0.5 < 0, xmax=801 > width=800"


def dior_folder(root: Path) -> Path:
    """A DIOR-RSVG folder: 00001 fine; 00002 with one fine, one far-out and one slightly-off
    box; 00003 whose only object is far out; 00004 (test split) fine."""
    write_voc(root / "Annotations" / "00001.xml", [("ship", (10, 20, 110, 90), "the ship on the left")],
              filename="00001.jpg", size=(W, H))
    write_voc(root / "Annotations" / "00002.xml", [
        ("ship", (100, 100, 200, 200), "the small ship"),
        ("ship", (300, 100, 4000, 200), "the ship that runs off the image"),
        ("ship", (700, -0.5, 801, 50), "the ship at the top right corner"),
    ], filename="00002.jpg", size=(W, H))
    write_voc(root / "Annotations" / "00003.xml", [("bridge", (-900, 10, 50, 60), "the bridge")],
              filename="00003.jpg", size=(W, H))
    write_voc(root / "Annotations" / "00004.xml", [("ship", (0, 0, W, H), "the big ship")],
              filename="00004.jpg", size=(W, H))
    for stem in ("00001", "00002", "00003", "00004"):
        write_image(root / "JPEGImages" / f"{stem}.jpg", (W, H))
    # running object index: 00001 -> 0; 00002 -> 1, 2, 3; 00003 -> 4; 00004 -> 5
    (root / "train.txt").write_text("0\n1\n2\n3\n4\n")
    (root / "val.txt").write_text("")
    (root / "test.txt").write_text("5\n")
    return root


# ---------- the policy itself ----------

@pytest.mark.parametrize("box,status,result", [
    ((0, 0, W, H), "inside", (0, 0, W, H)),  # VOC's xmax may equal the width
    ((10, 10, W + 1, H), "clipped", (10, 10, W, H)),  # 1 px over: an off-by-one slip
    ((-8, 10, 50, 60), "clipped", (0, 10, 50, 60)),  # within 1% of the 800 px side
    ((-9, 10, 50, 60), "outside", None),  # beyond it
    ((10, 10, 5 * W, 60), "outside", None),
    ((W + 0.5, 10, W + 1, 60), "outside", None),  # within the tolerance, but nothing left inside
])
def test_fit_box(box, status, result):
    fit = fit_box(box, (W, H))
    assert (fit.status, fit.box) == (status, result)


def test_fit_box_names_the_field_and_the_bound():
    assert fit_box((10, 10, 4000, 60), (W, H)).detail == "xmax=4000 > width=800"
    assert fit_box((-40, 10, 50, 700), (W, H)).detail == "xmin=-40 < 0, ymax=700 > height=600"
    assert fit_box((0, 0, 64.5, 10), (64, 64)).status == "clipped"  # small image: the 1 px floor
    assert fit_box((0, 0, 66, 10), (64, 64)).status == "outside"


# ---------- the reader ----------

def test_reader_skips_far_out_boxes_and_clips_near_ones(tmp_path):
    samples, report = read_benchmark("dior_rsvg", dior_folder(tmp_path / "dior_rsvg"), ["train"])
    assert [s.id for s in samples] == ["00001_0", "00002_0", "00002_2"]  # 00002_1 and 00003_0 left out
    assert samples[2].box == (700, 0.0, W, 50)  # clipped to the edge
    assert all(0 <= s.box[0] < s.box[2] <= W and 0 <= s.box[1] < s.box[3] <= H for s in samples)
    assert report.skipped == {BOX_OUTSIDE: 2} and report.clipped == {BOX_CLIPPED: 1}
    assert report.examples[BOX_OUTSIDE] == [BAD, "Annotations/00003.xml object[0]/bndbox: xmin=-900 < 0"]
    assert report.examples[BOX_CLIPPED] == [NEAR]
    summary = report.summary()
    assert f"skipped 2 {BOX_OUTSIDE} (e.g. {BAD})" in summary and f"clipped 1 {BOX_CLIPPED} (e.g. {NEAR})" in summary


# ---------- the builder and the data card ----------

def test_builder_leaves_the_bad_object_out_and_the_card_says_so(tmp_path):
    root = tmp_path / "corpus"
    dior_folder(root / "dior_rsvg")
    out = tmp_path / "instructions"
    # the fixture's images are one blank picture: the leakage check would drop every training
    # sample as a copy of the test image; `fail` keeps them (the gate would refuse the version)
    card = build(root, out, leakage=LeakageConfig(action="fail"))
    stage1 = json.loads((out / "stage1.json").read_text())
    stage2 = json.loads((out / "stage2.json").read_text())
    text = json.dumps(stage1 + stage2)
    assert "runs off the image" not in text and "the bridge" not in text  # not trained on
    assert "00003.jpg" not in text  # its only object skipped: the image gives no sample
    refer = {s["id"].split("-")[3]: s["conversations"][1]["value"] for s in stage1 if s["task"] == "refer"}
    assert set(refer) == {"00001_0", "00002_0", "00002_2"}
    assert refer["00002_2"] == "{<87><0><100><8>}"  # the clipped box
    # the detection answer of 00002 holds the two kept ships, not one clamped onto the edge
    detections = [s for s in stage1 if s["task"] == "detection" and s["image"].endswith("00002.jpg")]
    assert [len(parse_boxes(s["conversations"][1]["value"])) for s in detections] == [2]
    assert "<p>two ships</p>" in detections[0]["conversations"][1]["value"]

    saved = json.loads((out / "card.json").read_text())
    assert saved["skipped"] == {"dior_rsvg": {BOX_OUTSIDE: 2}}
    assert saved["clipped"] == {"dior_rsvg": {BOX_CLIPPED: 1}}
    assert saved["examples"]["dior_rsvg"][BOX_OUTSIDE][0] == BAD
    assert saved["examples"]["dior_rsvg"][BOX_CLIPPED] == [NEAR]
    assert saved["box_policy"] == BOX_POLICY
    md = (out / "DATA_CARD.md").read_text()
    assert f"| dior_rsvg | {BOX_OUTSIDE} | 2 |" in md and f"| dior_rsvg | {BOX_CLIPPED} | 1 |" in md
    assert f"`{BAD}`" in md and f"`{NEAR}`" in md and BOX_POLICY in md
    assert any(BAD in line for line in card["reports"])  # what `skyeye data build` prints


def test_a_card_without_box_defects_keeps_its_old_keys(tmp_path):
    """A corpus with no box off its image (SkyEye-Synth) builds a card without the box keys."""
    root = tmp_path / "corpus" / "dior_rsvg"
    write_voc(root / "Annotations" / "00001.xml", [("ship", (10, 20, 110, 90), "the ship")], size=(W, H))
    write_image(root / "JPEGImages" / "00001.jpg", (W, H))
    (root / "train.txt").write_text("0\n")
    (root / "test.txt").write_text("")
    build(tmp_path / "corpus", tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "card.json").read_text())
    assert list(saved) == ["stage1", "stage2", "eval", "skipped", "validation", "licences", "leakage"]
    assert saved["skipped"] == {}
    assert "Boxes and the image edge" not in (tmp_path / "out" / "DATA_CARD.md").read_text()
