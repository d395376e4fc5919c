"""The evaluation report: each chart writes a plausible PNG, the benchmark chart carries the
paper's series (labelled as real data), and the HTML page embeds every image."""
from __future__ import annotations

import base64
import re

import pytest
from PIL import Image, ImageDraw

from skyeye.evaluation.paper import SKYEYEGPT, flat
from skyeye.evaluation.report import (
    approval,
    benchmark_chart,
    grounding_examples,
    metrics_table,
    report_html,
    vqa_confusion,
)
from skyeye.formats.benchmarks import EVAL_KEYS
from tests.support import NOT_SIGNIFICANT, WORSE, vs_trivial

OURS = {"ucm_captions_test/cider": 41.0, "ucm_captions_test/bleu_1": 55.0, "rsvqa_lr_test/aa": 71.0,
        "rsvqa_hr_test/aa": 64.0, "dior_rsvg_test/acc_at_0.5": 43.0, "rsvg_test/acc_at_0.5": 38.0}
BASELINES = {"majority_answer": {"rsvqa_lr_test/aa": 48.0, "rsvqa_hr_test/aa": 50.0},
             "centred_box": {"dior_rsvg_test/acc_at_0.5": 2.0, "rsvg_test/acc_at_0.5": 1.0},
             "nearest_caption": {"ucm_captions_test/cider": 12.0}}


def _assert_png(path, min_bytes=8_000, min_side=300):
    assert path.exists() and path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side


@pytest.fixture(scope="module")
def charts(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # two tiny scenes with a bright object where the ground-truth box is
    rows = []
    for i, (box, answer) in enumerate([((16, 16, 40, 40), "{<25><25><62><62>}"),
                                       ((30, 10, 60, 30), "I cannot find it")]):
        image = Image.new("RGB", (64, 64), (40, 80, 40))
        ImageDraw.Draw(image).rectangle(box, fill=(230, 230, 230))
        image.save(out / f"scene_{i}.png")
        rows.append({"image": str(out / f"scene_{i}.png"), "box": box, "answer": answer,
                     "expression": "the white storage tank at the top left of the image, next to the road"})
    vqa_rows = ([{"question_type": "presence", "answer": "yes", "prediction": p} for p in ["yes"] * 5 + ["no"] * 2]
                + [{"question_type": "count", "answer": str(a), "prediction": str(p)}
                   for a, p in [(1, 1), (2, 1), (3, 3), (7, 1), (8, 2), (9, 9), (0, 0)]])
    chart, labels = benchmark_chart(OURS, BASELINES, SKYEYEGPT, out / "scores.png")
    return {"out": out, "chart": chart, "labels": labels,
            "grounding": grounding_examples(rows, out / "grounding.png"),
            "vqa": vqa_confusion(vqa_rows, out / "vqa.png", top_k=3)}


def test_benchmark_chart_shows_ours_baselines_and_the_paper(charts):
    _assert_png(charts["chart"], min_bytes=20_000, min_side=400)
    labels = charts["labels"]
    assert any("paper" in label and "real data" in label for label in labels)
    assert any("SkyEye-Synth" in label for label in labels)
    assert {"baseline: majority_answer", "baseline: centred_box", "baseline: nearest_caption"} <= set(labels)


def test_benchmark_chart_without_paper_numbers_has_no_paper_series(charts):
    # the label check above can fail: with no paper numbers the series is absent
    _, labels = benchmark_chart(OURS, BASELINES, {}, charts["out"] / "no_paper.png")
    assert not any("paper" in label for label in labels)
    # flat paper numbers are accepted as well as nested ones
    _, labels = benchmark_chart(OURS, {}, flat(SKYEYEGPT), charts["out"] / "flat.png")
    assert any("paper" in label for label in labels)


def test_grounding_examples_and_vqa_confusion_write_pngs(charts):
    _assert_png(charts["grounding"], min_side=250)
    _assert_png(charts["vqa"], min_side=250)


def test_report_html_embeds_every_image(charts):
    table = metrics_table(OURS, BASELINES, SKYEYEGPT)
    assert "<td>dior_rsvg_test/acc_at_0.5</td><td>43.00</td>" in table and "88.59" in table
    images = [charts["chart"], charts["grounding"], charts["vqa"]]
    page = report_html("Evaluation <run 1>", [("Scores", table), *((p.stem, p) for p in images)],
                       charts["out"] / "report.html")
    text = page.read_text()
    assert "<title>Evaluation &lt;run 1&gt;</title>" in text
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in images]
    assert "<table>" in text and 'src="http' not in text and "src=\"/" not in text


def test_the_report_says_which_tasks_are_approved():
    run = vs_trivial(EVAL_KEYS, {"grounding": WORSE, "rsvqa_hr_test_phili": NOT_SIGNIFICANT})
    assert approval(run).startswith("<p><b>Approved tasks: caption</b>; not approved: vqa (vs majority_answer), "
                                    "grounding (vs centred_box).")
    assert approval(vs_trivial(EVAL_KEYS)).startswith("<p><b>Approved tasks: caption, vqa, grounding</b>. ")
    assert approval({}).startswith("<p><b>Approved tasks: none</b>; not approved: caption")
