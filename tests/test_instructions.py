"""The instruction builder: the paper's formats, complete detection answers, conversations
that mix tasks, one evaluation file per scored split, a card that counts what was written."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from skyeye.data.instructions import build
from skyeye.data.readers import read_benchmark
from skyeye.formats.benchmarks import HOLDOUT_MODULUS, SCORED_SPLITS, VALIDATION_KEYS
from skyeye.formats.boxes import BOX_RE, first_box_pixels, iou, parse_boxes, to_grid
from skyeye.formats.prompts import IMAGE_PLACEHOLDER, PHRASINGS, STAGE1_TASKS, TASK_IDENTIFIERS
from skyeye.synth.video import EVENTS


def _load(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def test_stage1_has_every_task_in_the_paper_format(tiny_instructions):
    stage1 = _load(tiny_instructions, "stage1.json")
    assert set(s["task"] for s in stage1) == set(STAGE1_TASKS)
    for s in stage1:
        human, gpt = s["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith(IMAGE_PLACEHOLDER + " [")
        ident = human["value"][len(IMAGE_PLACEHOLDER) + 1:].split("]")[0] + "]"
        assert ident in TASK_IDENTIFIERS
        media = tiny_instructions / (s.get("image") or s["video"])
        assert media.exists(), media
        if s["task"] == "refer":
            assert BOX_RE.fullmatch(gpt["value"])
        for box in parse_boxes(human["value"] + gpt["value"]):
            assert all(0 <= v <= 100 for v in box) and box[0] < box[2] and box[1] < box[3]
        if s["task"] == "video_caption":
            assert s["frames"] > 1 and s["video"].endswith(".mp4")


def test_detection_answers_hold_every_object_of_the_class(tiny_synth, tiny_instructions):
    samples, _ = read_benchmark("dior_rsvg", tiny_synth / "dior_rsvg", ["train"])
    per_image = Counter((s.image.name, s.category) for s in samples)
    detections = [s for s in _load(tiny_instructions, "stage1.json")
                  if s["task"] == "detection" and s["source"] == "dior_rsvg"]
    assert detections
    for s in detections:
        answer = s["conversations"][1]["value"]
        assert answer.startswith("<p>") and "</p> {" in answer
        n = len(parse_boxes(answer))
        assert answer.count("<delim>") == n - 1
        assert n in {c for (img, _), c in per_image.items() if img == Path(s["image"]).name}


def test_stage2_conversations_mix_tasks(tiny_instructions):
    stage2 = _load(tiny_instructions, "stage2.json")
    assert stage2 and all(s["task"] == "conversation" for s in stage2)
    mixed = 0
    for s in stage2:
        turns = s["conversations"]
        assert len(turns) >= 6 and len(turns) % 2 == 0  # at least 3 question-answer pairs
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith(IMAGE_PLACEHOLDER)
        assert all(IMAGE_PLACEHOLDER not in t["value"] for t in turns[1:])  # the image appears once
        idents = {t["value"].split("]")[0].split("[")[-1] for t in turns[::2]}
        mixed += len(idents) > 1
    assert mixed / len(stage2) > 0.4
    sources = {s["source"] for s in stage2}
    assert {"dior_rsvg", "ucm_captions", "rsvqa_lr", "capera"} <= sources
    # clips talk too: their frames; a caption to a video prompt, the ERA event as a question, another wording
    clips = [s for s in stage2 if s["source"] == "capera"]
    assert clips and all(s["frames"] == 4 and s["video"].endswith(".mp4") and "image" not in s for s in clips)
    for s in clips:
        turns = s["conversations"]
        assert turns[0]["value"].split("[caption] ")[1] in PHRASINGS["video_caption"]
        assert turns[2]["value"].split("[vqa] ")[1] in PHRASINGS["event_vqa"]
        assert turns[3]["value"] in {e.replace("_", " ") for e in EVENTS}
        assert turns[1]["value"] != turns[5]["value"]  # two wordings of the clip


def test_captioning_prompts_get_captions_not_object_lists(tiny_instructions):
    """The grounding scenes' object list ("there are ... in the image") has its own questions:
    when it shared the captioning prompts, stage 2 taught the model to answer the benchmarks'
    caption prompt with an object list (UCM CIDEr 285 after stage 1, 202 after stage 2)."""

    asked = Counter()
    for s in _load(tiny_instructions, "stage2.json") + _load(tiny_instructions, "stage1.json"):
        turns = s["conversations"]
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            question = q["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            if a["value"].endswith("in the image."):
                asked["inventory" if question.removeprefix("[caption] ") in PHRASINGS["inventory"] else "other"] += 1
            if question.removeprefix("[caption] ") in PHRASINGS["caption"]:
                assert not a["value"].endswith("in the image."), (s["id"], question, a["value"])
    assert asked["inventory"] > 0 and asked["other"] == 0


def test_one_evaluation_file_per_scored_split(tiny_synth, tiny_instructions):
    files = {p.stem for p in (tiny_instructions / "eval").glob("*.json")}
    expected = {f"{b}_{s}" for b, splits in SCORED_SPLITS.items() for s in splits}
    assert files == expected and len(expected) == 10
    dior = _load(tiny_instructions / "eval", "dior_rsvg_test.json")
    truth, _ = read_benchmark("dior_rsvg", tiny_synth / "dior_rsvg", ["test"])
    assert len(dior["samples"]) == len(truth)
    for row, s in zip(dior["samples"], truth, strict=True):
        assert row["box"] == list(s.box) and row["prompt"] == f"[refer] {s.expression}"
    lr = _load(tiny_instructions / "eval", "rsvqa_lr_test.json")
    assert {"question", "answer", "question_type", "image_size"} <= set(lr["samples"][0])
    ucm = _load(tiny_instructions / "eval", "ucm_captions_test.json")
    assert all(len(r["references"]) == 5 for r in ucm["samples"])


def test_one_validation_file_per_unscored_val_split(tiny_synth, tiny_instructions):
    """Training's curves read these; RSVG's val is a scored (sealed) split, so it has none."""
    files = {p.stem for p in (tiny_instructions / "validation").glob("*.json")}
    assert files == set(VALIDATION_KEYS) and "rsvg_val" not in files and len(files) == 7
    dior = _load(tiny_instructions / "validation", "dior_rsvg_val.json")
    truth, _ = read_benchmark("dior_rsvg", tiny_synth / "dior_rsvg", ["val"])
    assert dior["held_out_of"] == "val" and [r["box"] for r in dior["samples"]] == [list(s.box) for s in truth]
    card = _load(tiny_instructions, "card.json")
    assert card["validation"]["dior_rsvg_val"] == {"samples": len(truth), "held_out_of": "val"}


def test_a_release_without_a_val_split_holds_part_of_train_out(tiny_synth, tmp_path):
    """CapERA as released has no val split: 1 in 10 train clips (crc32 of the file name) is
    held out as its validation split, and is in no instruction."""
    import zlib
    root = tmp_path / "corpus"
    shutil.copytree(tiny_synth / "capera", root / "capera")  # SkyEye-Synth writes the release's layout
    assert not list((root / "capera").glob("*val*"))
    train, _ = read_benchmark("capera", root / "capera", ["train"])
    held = {s.image.name for s in train if zlib.crc32(s.image.name.encode()) % HOLDOUT_MODULUS == 0}
    assert held and len(held) < len(train)
    card = build(root, tmp_path / "out")
    val = _load(tmp_path / "out" / "validation", "capera_val.json")
    assert val["held_out_of"] == "train" and {Path(r["video"]).name for r in val["samples"]} == held
    assert card["validation"]["capera_val"] == {"samples": len(held), "held_out_of": "train"}
    trained = {Path(s["video"]).name for name in ("stage1.json", "stage2.json")
               for s in _load(tmp_path / "out", name) if "video" in s}
    assert trained and not trained & held


def test_no_evaluation_or_validation_image_is_trained_on(tiny_instructions):
    train = {(s["source"], (tiny_instructions / (s.get("image") or s.get("video"))).resolve())
             for name in ("stage1.json", "stage2.json") for s in _load(tiny_instructions, name)}
    assert len(train) > 50
    for path in [*(tiny_instructions / "eval").glob("*.json"), *(tiny_instructions / "validation").glob("*.json")]:
        ev = json.loads(path.read_text())
        for row in ev["samples"]:
            media = row.get("image") or row.get("video")
            assert (path.parent / media).exists()  # relative to the evaluation file's folder
            assert (ev["benchmark"], (path.parent / media).resolve()) not in train


def test_card_counts_what_was_written(tiny_instructions):
    card = _load(tiny_instructions, "card.json")
    stage1 = _load(tiny_instructions, "stage1.json")
    assert card["stage1"]["total"] == len(stage1)
    assert card["stage1"]["by_task"] == dict(Counter(s["task"] for s in stage1))
    assert card["skipped"]["rsvqa_lr"]["inactive question"] > 0  # reported, not silently dropped
    text = (tiny_instructions / "DATA_CARD.md").read_text()
    assert "| refer |" in text and "inactive question" in text


def test_build_is_deterministic_and_atomic(tiny_synth, tiny_instructions, tmp_path):
    out = tmp_path / "instructions"
    build(tiny_synth, out)

    def digest(root):
        return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}

    # Same depth relative to the corpus gives the same relative paths, and the same bytes.
    sibling = tiny_synth.parent / "instructions2"
    build(tiny_synth, sibling)
    assert digest(sibling) == digest(tiny_instructions)
    shutil.rmtree(sibling)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_source_option_adds_a_folder_from_elsewhere(tiny_synth, tmp_path):
    elsewhere = tmp_path / "real" / "RSVQA-HR"
    shutil.copytree(tiny_synth / "rsvqa_hr", elsewhere)
    root = tmp_path / "only_ucm"
    shutil.copytree(tiny_synth / "ucm_captions", root / "ucm_captions")
    card = build(root, tmp_path / "out", {"rsvqa_hr": elsewhere})
    assert set(card["stage1"]["by_source"]) == {"ucm_captions", "rsvqa_hr"}
    with pytest.raises(ValueError, match="unknown benchmark 'rsvqa_xx'"):
        build(root, tmp_path / "out", {"rsvqa_xx": elsewhere})


def test_grid_boxes_round_trip():
    assert to_grid((0, 0, 799, 400), 800, 800) == (0, 0, 99, 50)
    assert to_grid((10, 10, 11, 11), 800, 800) == (1, 1, 2, 2)  # thinner than a cell keeps width 1
    px = first_box_pixels("the ship is at {<10><20><30><40>} and {<0><0><1><1>}", 200, 100)
    assert px == (20.0, 20.0, 60.0, 40.0)
    assert first_box_pixels("no box here", 10, 10) is None
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_captioning_prompts_are_answered_with_the_most_consensual_reference(tiny_synth, tiny_instructions):
    """Each image's captioning prompt has one answer, the reference that shares the most
    with the image's other references (what CIDEr rewards); the others stay in stage 2's
    "in other words" turns."""
    from skyeye.data.instructions import consensus_order
    from skyeye.data.records import CaptionSample

    def sample(i, caps):
        return CaptionSample(benchmark="ucm_captions", split="train", id=str(i), image=Path(f"{i}.png"), captions=caps)
    odd = ("a red car parks near two white buildings.", "two white buildings and a red car.",
           "a red car near two white buildings.", "sunset over a quiet town.", "a red car beside white buildings.")
    other = ("a ship on blue water.", "blue water with a ship.", "a ship sails on blue water.", "a harbour.",
             "a white ship on the blue water.")
    orders = consensus_order([sample(0, odd), sample(1, other)])
    assert sorted(orders[0]) == list(range(5)) and orders[0][-1] == 3 and orders[1][-1] == 3  # the outliers last
    assert orders[0][0] in (0, 2, 4)

    train, _ = read_benchmark("ucm_captions", tiny_synth / "ucm_captions", ["train"])
    best = {s.image.name: s.captions[o[0]] for s, o in zip(train, consensus_order(train), strict=True)}
    answers = {}
    for s in _load(tiny_instructions, "stage1.json"):
        if s["source"] == "ucm_captions" and s["task"] == "caption":
            answers.setdefault(Path(s["image"]).name, []).append(s["conversations"][1]["value"])
    assert answers and all(v == [best[k]] for k, v in answers.items())
    stage2 = [s for s in _load(tiny_instructions, "stage2.json") if s["source"] == "ucm_captions"]
    assert stage2
    for s in stage2:
        turns = s["conversations"]
        assert turns[1]["value"] == best[Path(s["image"]).name]
        again = [a["value"] for q, a in zip(turns[::2], turns[1::2], strict=True) if "other words" in q["value"]]
        assert again and again[0] != turns[1]["value"]
