"""Metric correctness with the paper's conventions: captioning equal to pycocoevalcap's own
scorers, IoU / Acc@0.5 edge cases, AA against OA on unbalanced types, and the paper's numbers
keyed like our metrics."""
from __future__ import annotations

import pytest

from skyeye.evaluation.metrics import CaptionScorer, caption_scores, grounding_scores, vqa_scores
from skyeye.evaluation.paper import MINIGPT_V2, SKYEYEGPT, flat
from skyeye.formats.benchmarks import CAPTION_METRICS, EVAL_KEYS, PRIMARY, TASK_OF
from skyeye.formats.boxes import iou

# five images, 2-5 references each, predictions from exact to unrelated (punctuation and case
# included, so the PTB tokenizer has work to do)
REFERENCES = [
    ["Many planes are parked at the airport.", "Several white airplanes stand near the terminal.",
     "An airport with planes parked next to the runway.", "Planes parked beside a long runway.",
     "Some aircraft are parked on the apron."],
    ["A river runs through green farmland.", "Green fields on both sides of a winding river."],
    ["Dense residential area with many houses and roads.", "Lots of houses are arranged densely.",
     "A dense residential area with trees."],
    ["A baseball field surrounded by trees.", "There is a baseball diamond next to some trees.",
     "A green baseball field is near a road.", "Trees around a baseball field."],
    ["Two storage tanks beside a road.", "There are two white storage tanks."],
]
PREDICTIONS = [
    "Many planes are parked at the airport.",
    "a river runs through the green fields",
    "Many houses, dense residential area!",
    "a tennis court next to a parking lot",
    "two white tanks near a road",
]


def _pycocoevalcap_reference(preds, refs, meteor) -> dict[str, float]:
    """The COCO caption evaluation called directly, as its own example does (x100)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
    out["meteor"], _ = meteor.compute_score(gts, res)
    out["rouge_l"], _ = Rouge().compute_score(gts, res)
    out["cider"], _ = Cider().compute_score(gts, res)
    return {k: 100 * v for k, v in out.items()}


@pytest.fixture(scope="module")
def captions():
    """Every captioning score of this module from one METEOR process (it takes ~15 s to load).
    The reference calls pycocoevalcap's `Meteor` object that our scorer holds: the Java process
    keeps no state between requests, and what is under test is everything around it."""
    with CaptionScorer() as scorer:
        ours = scorer.score(PREDICTIONS, REFERENCES)
        expected = _pycocoevalcap_reference(PREDICTIONS, REFERENCES, scorer._meteor)
        perfect = scorer.score([refs[0] for refs in REFERENCES], REFERENCES)
        empty = scorer.score(["", "...", "", "", ""], REFERENCES)
    return {"ours": ours, "expected": expected, "perfect": perfect, "empty": empty,
            "process": scorer._meteor.meteor_p}


def test_caption_scores_equal_pycocoevalcap(captions):
    expected = captions["expected"]
    assert set(captions["ours"]) == set(CAPTION_METRICS)
    for metric in CAPTION_METRICS:
        assert captions["ours"][metric] == pytest.approx(expected[metric], rel=1e-9), metric
    # on the paper's x100 scale, and the set is neither perfect nor hopeless
    assert 20 < captions["ours"]["bleu_1"] < 100 and captions["ours"]["cider"] > 10


def test_perfect_prediction_scores_bleu_1_100(captions):
    assert captions["perfect"]["bleu_1"] == pytest.approx(100, abs=1e-6)
    assert captions["perfect"]["bleu_4"] == pytest.approx(100, abs=1e-6)
    assert captions["perfect"]["meteor"] > captions["ours"]["meteor"]


def test_empty_predictions_score_zero_without_hanging(captions):
    assert captions["empty"]["meteor"] == 0 and captions["empty"]["cider"] == 0
    assert captions["empty"]["bleu_1"] == pytest.approx(0, abs=1e-6)


def test_meteor_process_is_closed(captions):
    assert captions["process"].poll() is not None  # the Java process has exited


def test_caption_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        caption_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="sample 1 has no reference"):
        caption_scores(["a", "b"], [["a"], [" "]])


def test_missing_java_is_named(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="need Java"):
        caption_scores(["a plane"], [["a plane"]])


# ---- grounding ----------------------------------------------------------------------------
# a 100 x 100 image: grid units equal pixels, so boxes below are exact
SIZE = (100, 100)


def test_iou_edge_cases():
    assert iou((0, 0, 50, 50), (50, 0, 100, 50)) == 0  # touching edges
    assert iou((10, 10, 60, 60), (10, 10, 60, 60)) == 1
    assert iou((0, 0, 100, 100), (0, 0, 50, 100)) == 0.5
    assert iou((10, 10, 10, 50), (10, 10, 10, 50)) == 0  # zero area on both sides: no division by 0


@pytest.mark.parametrize("answer, gt, hit, parsed", [
    ("{<0><0><50><50>}", (0, 0, 50, 50), True, True),                   # identical
    ("<p>plane</p> {<20><20><80><80>} more", (20, 20, 80, 80), True, True),  # box inside text
    ("{<0><0><50><100>}", (0, 0, 100, 100), False, True),              # IoU exactly 0.5: rule is > 0.5
    ("{<0><0><51><100>}", (0, 0, 100, 100), True, True),               # IoU 0.51
    ("{<50><0><100><50>}", (0, 0, 50, 50), False, True),               # touching: IoU 0
    ("{<10><10><10><50>}", (10, 10, 40, 50), False, True),             # zero-area prediction
    ("the plane at the top left", (0, 0, 50, 50), False, False),       # unparseable: a miss
    ("{<0><0><50>}", (0, 0, 50, 50), False, False),                    # three numbers: not a box
    ("{<60><60><90><90>} {<0><0><50><50>}", (0, 0, 50, 50), False, True),  # only the first box counts
])
def test_acc_at_05_cases(answer, gt, hit, parsed):
    scores = grounding_scores([answer], [gt], [SIZE])
    assert scores["acc_at_0.5"] == (100 if hit else 0)
    assert scores["parsed"] == (100 if parsed else 0)


def test_grounding_scores_aggregate():
    preds = ["{<0><0><50><50>}", "{<0><0><50><100>}", "no box", "{<0><0><100><100>}"]
    gts = [(0, 0, 50, 50), (0, 0, 100, 100), (0, 0, 50, 50), (0, 0, 100, 100)]
    scores = grounding_scores(preds, gts, [SIZE] * 4)
    assert scores == {"acc_at_0.5": 50.0, "parsed": 75.0, "mean_iou": pytest.approx(100 * 2.5 / 4)}
    # boxes are scaled from the 0-100 grid back to each image's own pixels
    assert grounding_scores(["{<25><50><50><100>}"], [(200, 200, 400, 400)], [(800, 400)])["acc_at_0.5"] == 100
    with pytest.raises(ValueError, match="differ in length"):
        grounding_scores(preds, gts[:3], [SIZE] * 4)


# ---- VQA ----------------------------------------------------------------------------------

def test_aa_differs_from_oa_on_unbalanced_types():
    # presence: 8 of 8 right; comp: 0 of 2 right  -> AA 50, OA 80
    preds = ["yes"] * 8 + ["no", "no"]
    answers = ["Yes."] * 8 + ["yes", "yes"]  # normalisation: case and trailing punctuation
    types = ["presence"] * 8 + ["comp"] * 2
    scores = vqa_scores(preds, answers, types)
    assert scores == {"acc_presence": 100.0, "acc_comp": 0.0, "aa": 50.0, "aa_all": 50.0, "oa": 80.0}


def test_count_and_area_are_left_out_of_aa():
    preds = ["yes", "yes", "no", "rural", "3", "0", "0", "0", "0m2", "10m2"]
    answers = ["yes", "yes", "yes", "rural", "3", "1", "2", "4", "0m2", "0m2"]
    types = ["presence"] * 3 + ["rural_urban"] + ["count"] * 4 + ["area"] * 2
    scores = vqa_scores(preds, answers, types)
    assert scores["acc_presence"] == pytest.approx(200 / 3)
    assert scores["acc_rural_urban"] == 100 and scores["acc_count"] == 25 and scores["acc_area"] == 50
    assert scores["aa"] == pytest.approx((200 / 3 + 100) / 2)  # presence and rural_urban only
    assert scores["aa_all"] == pytest.approx((200 / 3 + 100 + 25 + 50) / 4)
    assert scores["oa"] == pytest.approx(100 * 5 / 10)


def test_aa_falls_back_to_all_types_without_paper_types():
    scores = vqa_scores(["1", "2", "0m2"], ["1", "3", "0m2"], ["count", "count", "area"])
    assert scores["aa"] == scores["aa_all"] == 75.0


def test_lost_question_type_is_refused():
    with pytest.raises(ValueError, match="question type missing"):
        vqa_scores(["yes", "no"], ["yes", "no"], ["presence", None])


# ---- the paper's numbers ------------------------------------------------------------------

def test_paper_numbers_cover_every_benchmark_with_its_primary_metric():
    for scores in (SKYEYEGPT, MINIGPT_V2):
        assert set(scores) == set(EVAL_KEYS)
        for key in EVAL_KEYS:
            assert PRIMARY[TASK_OF[key]] in scores[key], key
        for key in ("ucm_captions_test", "sydney_captions_test", "rsicd_test", "capera_test"):
            assert tuple(scores[key]) == CAPTION_METRICS
    assert flat(SKYEYEGPT)["dior_rsvg_test/acc_at_0.5"] == 88.59
    assert flat(SKYEYEGPT)["ucm_captions_test/cider"] == 236.75
    # the paper's "avg" is AA, the mean of the reported types (count/area left out)
    for key in ("rsvqa_lr_test", "rsvqa_hr_test", "rsvqa_hr_test_phili"):
        accs = [v for m, v in SKYEYEGPT[key].items() if m.startswith("acc_")]
        assert SKYEYEGPT[key]["aa"] == pytest.approx(sum(accs) / len(accs), abs=0.01)
