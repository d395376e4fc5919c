"""The GX gate on a small valid corpus, then once per defect (real GX, no mocks).

Each defect test copies the valid corpus, introduces exactly one defect and checks that
the gate fails naming it (table, column, offending file/id) and nothing unrelated.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import pytest
from PIL import Image

from skyeye.datagate.expectations import Failure, ValidationResult, validate

CAPTION = "[caption] Briefly describe this image."
IMG = "<Img><ImageHere></Img>"


def _png(path: Path, seed: int, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # noise: PNG cannot compress it away, so truncation bites
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _mp4(path: Path, frames: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _sample(sid: str, source: str, task: str, image: str, *turns: str, key: str = "image") -> dict[str, Any]:
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    conv[0]["value"] = f"{IMG} {conv[0]['value']}"
    rec = {"id": sid, "source": source, "task": task, key: image, "conversations": conv}
    if key == "video":
        rec["frames"] = 4
    return rec


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _build_corpus(root: Path) -> None:
    synth = root / "synth"
    for i in range(4):
        _png(synth / f"ucm_captions/imgs/{i}.png", i)
        _png(synth / f"rsvqa_lr/imgs/{i}.png", 10 + i)
        _png(synth / f"dior_rsvg/JPEGImages/{i}.png", 20 + i)
    _mp4(synth / "capera/videos/0.mp4")
    s = "../synth"
    stage1 = [
        _sample("s1-ucm-0", "ucm_captions", "caption", f"{s}/ucm_captions/imgs/0.png",
                CAPTION, "two white airplanes are parked next to the runway."),
        _sample("s1-capera-0", "capera", "video_caption", f"{s}/capera/videos/0.mp4",
                "[caption] Describe this video.", "a car drives along a road past houses", key="video"),
        _sample("s1-rsvqa_lr-0", "rsvqa_lr", "vqa", f"{s}/rsvqa_lr/imgs/0.png",
                "[vqa] Is there a road?", "yes"),
        _sample("s1-ucm-1", "ucm_captions", "scene_vqa", f"{s}/ucm_captions/imgs/1.png",
                "[vqa] Which scene is this?", "airport"),
        _sample("s1-dior-0", "dior_rsvg", "refer", f"{s}/dior_rsvg/JPEGImages/0.png",
                "[refer] the red ship at the top", "<p>the red ship at the top</p> {<9><51><50><82>}"),
        _sample("s1-dior-1", "dior_rsvg", "identify", f"{s}/dior_rsvg/JPEGImages/1.png",
                "[identify] {<9><51><50><82>}", "a red ship"),
        _sample("s1-dior-2", "dior_rsvg", "detection", f"{s}/dior_rsvg/JPEGImages/0.png",
                "[detection] ship", "<p>ship</p> {<9><51><50><82>}<delim>{<53><47><97><78>}"),
    ]
    stage2 = [_sample("s2-dior-0", "dior_rsvg", "conversation", f"{s}/dior_rsvg/JPEGImages/1.png",
                      "[caption] Describe the image.", "a harbour with several ships along the pier",
                      "[refer] the ship on the left", "{<5><10><30><40>}",
                      "[vqa] How many ships are there?", "three")]
    e = "../../synth"
    refs = ["many planes are parked at the airport", "an airport with planes and runways",
            "several white planes near a terminal", "planes parked beside the runway today",
            "an airport apron with four planes"]
    captions = {"benchmark": "ucm_captions", "split": "test", "task": "caption", "samples": [
        {"id": f"ucm-test-{i}", "image": f"{e}/ucm_captions/imgs/{i}.png", "references": refs}
        for i in (2, 3)]}
    qs = [("presence", "Is there a road?", "yes"), ("presence", "Is there a building?", "no"),
          ("comp", "Are there more roads than buildings?", "yes"), ("rural_urban", "Is it urban?", "no")]
    vqa = {"benchmark": "rsvqa_lr", "split": "test", "task": "vqa", "samples": [
        {"id": f"lr-test-{i}", "image": f"{e}/rsvqa_lr/imgs/{2 + i % 2}.png", "question": q, "answer": a,
         "question_type": t} for i, (t, q, a) in enumerate(qs)]}
    grounding = {"benchmark": "dior_rsvg", "split": "test", "task": "grounding", "samples": [
        {"id": f"dior-test-{i}", "image": f"{e}/dior_rsvg/JPEGImages/{i}.png", "image_size": [64, 64],
         "prompt": "[refer] the red ship at the top", "expression": "the red ship at the top",
         "box": [10.0, 4.0, 40.5, 30.0]} for i in (2, 3)]}
    inst = root / "instructions"
    _write(inst / "stage1.json", stage1)
    _write(inst / "stage2.json", stage2)
    _write(inst / "eval/ucm_captions_test.json", captions)
    _write(inst / "eval/rsvqa_lr_test.json", vqa)
    _write(inst / "eval/dior_rsvg_test.json", grounding)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    _build_corpus(root)
    return root


@pytest.fixture(scope="module")
def gx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gx")  # one GX context for the module: its set-up is reused


def _edit(path: Path, change: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _defect(corpus: Path, tmp_path: Path, gx_root: Path, defect: Callable[[Path], None]) -> ValidationResult:
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    defect(root)
    result = validate(root / "instructions", gx_root, data_docs=False)
    assert result.success is False
    json.dumps(result.to_dict())  # stays serialisable with real offending rows in it
    return result


def _names(result: ValidationResult, table: str, column: str,
           allowed: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()) -> Failure:
    """The failure on table.column; every other failure must be in `allowed` (same defect)."""
    found = [f for f in result.failures if (f.table, f.column) == (table, column)]
    assert found, result.render()
    extra = {(f.table, f.column) for f in result.failures} - {(table, column)} - set(allowed)
    assert not extra, result.render()
    return found[0]


def test_valid_corpus_passes_and_writes_data_docs(corpus: Path, gx_root: Path) -> None:
    result = validate(corpus / "instructions", gx_root)
    assert result.success, result.render()
    assert result.n_records == 8 + 8 and result.failures == []
    assert result.data_docs_index is not None and result.data_docs_index.name == "index.html"
    assert result.data_docs_index.is_file()
    assert result.data_docs_index.is_relative_to(gx_root)
    assert "PASSED" in result.render()


def test_truncated_image(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        img = root / "synth/ucm_captions/imgs/0.png"
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "images", "error")
    assert f.expectation == "expect_column_values_to_be_null"
    assert f.examples[0]["path"].endswith("ucm_captions/imgs/0.png") and f.examples[0]["id"] == "s1-ucm-0"
    assert "truncated" in f.examples[0]["error"]


def test_broken_video(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        clip = root / "synth/capera/videos/0.mp4"
        clip.write_bytes(clip.read_bytes()[:-200])

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "images", "error")
    assert f.examples[0]["id"] == "s1-capera-0" and f.examples[0]["path"].endswith("0.mp4")


def test_box_off_the_grid(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        _edit(root / "instructions/stage1.json",
              lambda d: d[4]["conversations"][1].update(value="<p>the red ship</p> {<9><51><105><82>}"))

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "boxes", "x2")
    assert f.expectation == "expect_column_values_to_be_between"
    assert f.examples == [{"file": "stage1.json", "index": 4, "id": "s1-dior-0",
                           "text": "{<9><51><105><82>}", "x2": 105.0}]


def test_box_x1_not_below_x2(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        _edit(root / "instructions/stage1.json",
              lambda d: d[5]["conversations"][0].update(value=IMG + " [identify] {<50><51><50><82>}"))

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "boxes", "x2,x1")
    assert f.expectation == "expect_column_pair_values_a_to_be_greater_than_b"
    assert f.examples[0]["id"] == "s1-dior-1" and f.examples[0]["text"] == "{<50><51><50><82>}"


def test_empty_caption(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        _edit(root / "instructions/stage1.json", lambda d: d[0]["conversations"][1].update(value=""))

    result = _defect(corpus, tmp_path, gx_root, defect)
    f = _names(result, "turns", "caption_words", allowed={("turns", "value")})
    assert f.examples[0]["id"] == "s1-ucm-0" and f.examples[0]["caption_words"] == 0


def test_leaked_image(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:  # a test image of ucm_captions reused for a stage1 caption
        _edit(root / "instructions/stage1.json",
              lambda d: d[0].update(image="../synth/ucm_captions/imgs/2.png"))

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "leakage", "train_id")
    assert f.unexpected_count == 1
    assert f.examples[0] == {"file": "eval/ucm_captions_test.json", "id": "ucm-test-2",
                             "path": "../../synth/ucm_captions/imgs/2.png", "train_source": "ucm_captions",
                             "distance": 0, "train_id": "s1-ucm-0"}


def test_duplicate_id(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:  # across stage files: stage2's id repeats a stage1 id
        _edit(root / "instructions/stage2.json", lambda d: d[0].update(id="s1-dior-1"))

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "samples", "id")
    assert f.expectation == "expect_column_values_to_be_unique" and f.unexpected_count == 2
    assert {e["file"] for e in f.examples} == {"stage1.json", "stage2.json"}


def test_unknown_task_identifier(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        _edit(root / "instructions/stage1.json",
              lambda d: d[4]["conversations"][0].update(value=IMG + " [segment] the red ship"))

    result = _defect(corpus, tmp_path, gx_root, defect)
    f = _names(result, "turns", "identifier", allowed={("samples", "task_identifier")})
    assert f.examples[0] == {"file": "stage1.json", "index": 4, "id": "s1-dior-0", "turn": 0,
                             "identifier": "[segment]"}


def test_malformed_json_is_reported_and_the_rest_still_checked(corpus: Path, tmp_path: Path,
                                                               gx_root: Path) -> None:
    def defect(root: Path) -> None:
        (root / "instructions/eval/rsvqa_lr_test.json").write_text('{"benchmark": "rsvqa_lr", "samples": [')

    result = _defect(corpus, tmp_path, gx_root, defect)
    f = _names(result, "files", "parse_error")
    assert f.examples[0]["file"] == "eval/rsvqa_lr_test.json"
    assert "JSONDecodeError" in f.examples[0]["parse_error"]
    assert result.n_instructions == 8 and result.n_eval == 4  # the other files were read


def test_missing_image(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        (root / "synth/rsvqa_lr/imgs/0.png").unlink()

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "images", "exists")
    assert f.examples[0] == {"file": "stage1.json", "id": "s1-rsvqa_lr-0",
                             "path": "../synth/rsvqa_lr/imgs/0.png", "exists": False}


def test_duplicate_sample(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        _edit(root / "instructions/stage1.json", lambda d: d.append({**d[2], "id": "s1-rsvqa_lr-1"}))

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "samples", "media,prompt_text,answer_text")
    assert f.expectation == "expect_compound_columns_to_be_unique"
    assert {e["id"] for e in f.examples} == {"s1-rsvqa_lr-0", "s1-rsvqa_lr-1"}


def test_vqa_type_imbalance(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        def add(d: dict) -> None:
            d["samples"] += [{**d["samples"][0], "id": f"lr-test-x{i}"} for i in range(300)]
        _edit(root / "instructions/eval/rsvqa_lr_test.json", add)

    f = _names(_defect(corpus, tmp_path, gx_root, defect), "vqa_types", "share")
    assert {e["question_type"] for e in f.examples} == {"presence", "comp", "rural_urban"}
    assert all(e["file"] == "eval/rsvqa_lr_test.json" for e in f.examples)


def test_conversation_not_alternating(corpus: Path, tmp_path: Path, gx_root: Path) -> None:
    def defect(root: Path) -> None:
        def swap(d: list) -> None:
            conv = d[0]["conversations"]
            conv[2], conv[3] = conv[3], conv[2]
        _edit(root / "instructions/stage2.json", swap)

    result = _defect(corpus, tmp_path, gx_root, defect)
    # the gpt turn now follows a caption prompt, so it also reads as a too-short caption
    f = _names(result, "turns", "role,expected_role", allowed={("turns", "caption_words")})
    assert f.unexpected_count == 2 and {e["id"] for e in f.examples} == {"s2-dior-0"}
    assert "s2-dior-0" in result.render()
