"""Instruction sets in the LLaVA format as training sources: each box notation onto the 0-100
grid, task identifiers kept or inferred, bad rows counted and named, the build with a LLaVA
source (its rows pass the data gate) and the licences in the data card. Fixtures:
tests/data/llava (made in the published layout; README there)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from skyeye.cli import app
from skyeye.config import DataConfig, SourceConfig
from skyeye.data.instructions import build
from skyeye.data.llava import (
    BOX_FORMAT_RULE,
    grid_box,
    infer_box_format,
    infer_identifier,
    read_llava,
)
from skyeye.data.records import BOX_CLIPPED, DataFormatError
from skyeye.formats.licences import SYNTH_LICENCE, UNKNOWN
from skyeye.formats.prompts import IMAGE_PLACEHOLDER

DATA = Path(__file__).parent / "data" / "llava"
BOX = "{<10><20><40><60>}"  # the object every fixture file boxes, in its own notation
runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava_images")
    for i, colour in enumerate([(90, 90, 90), (30, 60, 120), (120, 100, 60)], start=1):
        Image.new("RGB", (320, 320), colour).save(folder / f"P000{i}.png")
    return folder


def _by_id(samples):
    return {s.id: s for s in samples}


@pytest.mark.parametrize("file, fmt", [("grid100", "auto"), ("unit", "unit"), ("grid1000", "grid1000"),
                                       ("pixels", "pixels")])
def test_every_box_notation_lands_on_the_same_grid_box(images, file, fmt):
    samples, report, used = read_llava(file, DATA / f"{file}.json", images, fmt)
    first = samples[0]
    assert used == file  # grid100 inferred, the others as declared
    assert first.turns[0][1] == BOX or BOX in first.turns[0][0], first.turns
    for s in samples:
        for q, a in s.turns:
            assert "<image>" not in q and "<box>" not in a and "[0." not in a


def test_the_box_format_rule(images):
    assert infer_box_format([0.1, 0.2, 0.4, 0.6]) == "unit"
    assert infer_box_format([10, 20, 40, 60, 0, 1]) == "grid100"
    assert infer_box_format([0, 1, 1, 0]) == "grid100"  # whole numbers only: the grid, not fractions
    assert infer_box_format([100, 200, 400, 600]) is None  # 0-1000 grid or pixels: not guessed
    assert infer_box_format([0.5, 1.2]) is None
    with pytest.raises(DataFormatError, match=r"grid1000.json: field 'box_format': box numbers from 50 to 1200 "
                                              r"are not inferred; declare the source's box_format"):
        read_llava("q", DATA / "grid1000.json", images)
    with pytest.raises(DataFormatError, match=r"unit.json: field 'box_format': box numbers from 0.1 to 1.2 "):
        read_llava("u", DATA / "unit.json", images)  # one box past 1 breaks the rule
    assert "auto" in BOX_FORMAT_RULE
    # value / side x 100 truncated, exactly: 0.29 of the side is cell 29, not 28 (float 28.999...)
    assert grid_box((0.29, 0.29, 0.58, 0.58), "unit", (1, 1), "x") == "{<29><29><58><58>}"
    assert grid_box((290, 290, 580, 581), "grid1000", (1, 1), "x") == "{<29><29><58><58>}"
    assert grid_box((50, 50, 50.5, 60), "grid100", (1, 1), "x") == "{<50><50><51><60>}"  # thinner than a cell


def test_task_identifiers_kept_or_inferred(images):
    geochat = _by_id(read_llava("geochat", DATA / "grid100.json", images)[0])
    assert geochat["P0001_refer"].turns == (("[refer] Where is the white airplane next to the runway?", BOX),)
    assert geochat["P0001_identify"].task == "identify"
    assert geochat["P0001_identify"].turns[0][0] == f"[identify] What is the object present at {BOX}"
    # another set's tag is dropped; two boxes in the answer and none asked: [detection]
    grounding = geochat["P0002_grounding"]
    assert grounding.task == "detection" and grounding.turns[0][0] == "[detection] Find all the ships in the harbour."
    conv = geochat["P0003_conversation"]
    assert conv.task == "conversation" and [q.split("]")[0] + "]" for q, _ in conv.turns] == [
        "[caption]", "[vqa]", "[refer]"]
    shikra = _by_id(read_llava("shikra", DATA / "unit.json", images, "unit")[0])
    assert {k: s.task for k, s in shikra.items()} == {"1": "refer", "2": "identify", "3": "caption", "4": "vqa"}
    assert shikra["2"].turns[0][0] == f"[identify] What is in the region {BOX}?"  # <image> after the text
    assert infer_identifier("where?", "{<1><1><2><2>}<delim>{<3><3><4><4>}") == "[detection]"
    assert infer_identifier(f"what links {BOX} and {BOX}?", f"{BOX} is left of it") == "[vqa]"


def test_bad_rows_are_counted_and_named(images):
    _, report, _ = read_llava("shikra", DATA / "unit.json", images, "unit")
    assert dict(report.skipped) == {"missing image file": 1, "no image (a text-only row)": 1,
                                    "box outside the 0-1 range of box_format unit": 1,
                                    "<image> other than once in the first human turn": 1}
    assert report.examples["missing image file"] == ["unit.json[5] (id 6).image=P0404.png"]
    assert report.examples["<image> other than once in the first human turn"] == [
        "unit.json[7] (id 8).conversations[2]"]
    assert report.kept["train"] == 4
    _, report, _ = read_llava("geochat", DATA / "grid100.json", images)
    assert dict(report.skipped) == {"oriented box (angle not 0)": 1}
    assert "grid100.json[3] (id P0002_rotated).conversations[1]: {<5><5><20><15>|<45>}" in \
        report.examples["oriented box (angle not 0)"][0]
    samples, report, _ = read_llava("px", DATA / "pixels.json", images, "pixels")
    assert dict(report.skipped) == {"box outside the image (box_format pixels)": 1,
                                    "box without area (needs x1 < x2 and y1 < y2)": 1}
    assert dict(report.clipped) == {BOX_CLIPPED: 1}  # by the benchmarks' box policy: kept, clipped and counted
    assert report.examples[BOX_CLIPPED] == ["pixels.json[1] (id px2).conversations[1]: [300, 10, 322, 40] "
                                            "(xmax=322 > width=320)"]
    assert _by_id(samples)["px2"].turns[0][1] == "{<93><3><100><12>}"  # 300..322 of 320 px, clipped to 320
    _, report, _ = read_llava("q", DATA / "grid1000.json", images, "grid1000")
    assert dict(report.skipped) == {"box outside the 0-1000 range of box_format grid1000": 1}


def test_source_config_forms():
    cfg = DataConfig.model_validate({"sources": {"rsvqa_hr": "/datasets/RSVQA-HR",
                                                 "geochat": {"path": "g.json", "images": "imgs",
                                                             "licence": "CC BY-NC 4.0"}}})
    specs = cfg.source_configs()
    assert not specs["rsvqa_hr"].is_llava and specs["rsvqa_hr"].licence is None
    assert specs["geochat"].is_llava and specs["geochat"].box_format == "auto"
    with pytest.raises(ValueError, match="images: a LLaVA source"):
        SourceConfig(path=Path("g.json"))
    with pytest.raises(ValueError, match="only for a LLaVA source"):
        SourceConfig(path=Path("/datasets/DIOR"), box_format="pixels")
    with pytest.raises(ValueError, match="source name"):
        DataConfig.model_validate({"sources": {"GeoChat": "x.json"}})


def test_build_with_llava_sources_passes_the_gate_and_records_licences(tiny_synth, images, tmp_path):
    out = tmp_path / "instructions"
    r = runner.invoke(app, ["data", "build", "--root", str(tiny_synth), "--out", str(out),
                            "--source", f"geochat={DATA / 'grid100.json'}", "--images", f"geochat={images}",
                            "--source", f"shikra={DATA / 'unit.json'}", "--images", f"shikra={images}",
                            "--box-format", "shikra=unit", "--licence", "geochat=CC BY-NC 4.0"])
    assert r.exit_code == 0, r.output
    assert "shikra: kept train=4; skipped 1 <image> other than once" in r.output
    assert "CC BY-NC 4.0 (geochat)" in r.output and "unknown (shikra)" in r.output
    stage1 = json.loads((out / "stage1.json").read_text())
    stage2 = json.loads((out / "stage2.json").read_text())
    ours = [s for s in stage1 if s["source"] in ("geochat", "shikra")]
    assert len(ours) == 7 and [s["source"] for s in stage2].count("geochat") == 1
    refer = next(s for s in ours if s["id"] == "s1-geochat-refer-P0001_refer")
    assert refer["conversations"][0]["value"] == \
        f"{IMAGE_PLACEHOLDER} [refer] Where is the white airplane next to the runway?"
    assert (out / refer["image"]).resolve() == (images / "P0001.png").resolve()
    card = json.loads((out / "card.json").read_text())
    assert card["licences"]["geochat"] == "CC BY-NC 4.0" and card["licences"]["shikra"] == UNKNOWN
    assert card["licences"]["dior_rsvg"] == SYNTH_LICENCE
    assert card["llava"] == {"geochat": {"file": "grid100.json", "box_format": "grid100 (inferred)"},
                             "shikra": {"file": "unit.json", "box_format": "unit"}}
    assert card["skipped"]["shikra"]["missing image file"] == 1
    text = (out / "DATA_CARD.md").read_text()
    assert "| geochat | CC BY-NC 4.0 |" in text and f"| dior_rsvg | {SYNTH_LICENCE} |" in text
    r = runner.invoke(app, ["data", "validate", "--data", str(out), "--no-record"])
    assert r.exit_code == 0, r.output


def test_a_real_benchmark_folder_takes_its_declared_or_recorded_licence(tiny_synth, tmp_path):
    card = build(tiny_synth, tmp_path / "a", {"rsvg": SourceConfig(path=tiny_synth / "rsvg", licence="MIT")})
    assert card["licences"]["rsvg"] == "MIT" and card["licences"]["ucm_captions"] == SYNTH_LICENCE
    copy = tmp_path / "real_rsvg"  # outside the synthetic corpus: no SkyEye-Synth marker beside it
    import shutil
    shutil.copytree(tiny_synth / "rsvg", copy)
    card = build(tiny_synth, tmp_path / "b", {"rsvg": copy})
    assert card["licences"]["rsvg"] == UNKNOWN


@pytest.mark.parametrize("args, message", [
    (["--source", "geochat=G.json", "--images", "x"], "--source geochat=G.json: no such file"),
    (["--source", f"geochat={DATA / 'grid100.json'}"], "needs the folder its image paths are relative to"),
    (["--source", f"a={DATA / 'grid100.json'}", "--source", f"b={DATA / 'unit.json'}", "--images", "x"],
     "--images x: say which LLaVA source it is for"),
    (["--source", f"rsvg={DATA / 'grid100.json'}", "--images", str(DATA)], "'rsvg' names a benchmark"),
    (["--source", f"g={DATA / 'grid100.json'}", "--images", str(DATA), "--box-format", "g=polar"],
     "--box-format g=polar: Input should be 'auto', 'grid100'"),
    (["--source", f"g={DATA / 'grid100.json'}", "--images", str(DATA), "--licence", "h=MIT"],
     "--licence h=...: no --source h=PATH"),
])
def test_build_refuses_bad_source_options_naming_them(tiny_synth, tmp_path, args, message):
    r = runner.invoke(app, ["data", "build", "--root", str(tiny_synth), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "o" / "stage1.json").exists()


def test_inspect_reads_a_llava_file(images):
    r = runner.invoke(app, ["data", "inspect", str(DATA / "unit.json"), "--media", str(images), "--box-format", "unit"])
    assert r.exit_code == 0, r.output
    assert "unit: kept train=4; skipped 1 <image> other than once in the first human turn" in r.output
    assert "box notation: unit; tasks: caption=1, identify=1, refer=1, vqa=1" in r.output
    r = runner.invoke(app, ["data", "inspect", str(DATA / "grid1000.json"), "--media", str(images)])
    assert r.exit_code == 2 and "declare the source's box_format" in r.output, r.output
