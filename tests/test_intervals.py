"""Bootstrap intervals and comparisons (`skyeye.evaluation.intervals`): the metrics recomputed
from weighted per-item statistics equal the scorers on the full set and, where the module says
exact, the scorers rerun on resampled items; the CIDEr and METEOR approximations stay within
stated tolerances of exact recomputation; a proportion's interval matches the normal
approximation; a comparison finds a planted difference and nothing where there is none."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from skyeye.evaluation.intervals import (
    Delta,
    ItemStats,
    bootstrap,
    compare,
    metric_values,
    resample_weights,
)
from skyeye.evaluation.metrics import CaptionScorer, grounding_items, grounding_scores, tokenised, vqa_items, vqa_scores
from skyeye.formats.benchmarks import CAPTION_METRICS

# ---- a small synthetic captioning set ------------------------------------------------------

OBJECTS = ["plane", "ship", "house", "tree", "road", "river", "tank", "bridge", "car", "building", "field", "pond"]
PLACES = ["airport", "harbor", "farmland", "forest", "parking lot", "residential area", "desert", "beach",
          "industrial area", "meadow", "stadium", "railway station"]
ADJECTIVES = ["many", "several", "some", "two", "large", "small", "white", "green", "dense", "few"]
TEMPLATES = ["{adj} {obj}s are in the {place}", "there are {adj} {obj}s near the {place}",
             "a {place} with {adj} {obj}s", "{adj} {obj}s beside a {place}",
             "the {place} has {adj} {obj}s and a {obj2}", "a {obj2} and {adj} {obj}s in a {place}",
             "this is a {place} with a {obj2}", "{adj} {obj}s surround the {place}"]
N_CAPTIONS, RESAMPLES_EXACT = 40, 200


def caption_set(n: int, seed: int) -> tuple[list[str], list[list[str]], list[str]]:
    """n images with 3-5 references about one scene each; a good system's captions (60% on the
    scene, 25% on the wrong place, 15% unrelated) and a worse one's (always the wrong place)."""
    rng = random.Random(seed)

    def caption(scene: dict) -> str:
        return rng.choice(TEMPLATES).format(adj=rng.choice(ADJECTIVES), **scene)

    def other_scene() -> dict:
        return {"obj": rng.choice(OBJECTS), "obj2": rng.choice(OBJECTS), "place": rng.choice(PLACES)}

    refs, good, worse = [], [], []
    for _ in range(n):
        scene = other_scene()
        refs.append([caption(scene) for _ in range(rng.randint(3, 5))])
        draw = rng.random()
        good.append(caption(scene if draw < 0.6 else scene | {"place": rng.choice(PLACES)} if draw < 0.85
                            else other_scene()))
        worse.append(caption(scene | {"place": rng.choice(PLACES)}))
    return good, refs, worse


def resampled(captions: dict, counts: np.ndarray) -> dict:
    """A resampled corpus for the COCO scorers: each item as often as drawn, every copy its own key."""
    return {k: captions[i] for k, i in enumerate(np.repeat(np.arange(len(counts)), counts.astype(int)))}


def spread(values: np.ndarray) -> tuple[float, float]:
    return tuple(np.percentile(values, [2.5, 97.5]))


@pytest.fixture(scope="module")
def captions():
    """Everything this module needs from Java (METEOR takes ~15 s to load): two systems' stats on
    one set, its tokenised captions, and METEOR rerun on resampled corpora."""
    good, refs, worse = caption_set(N_CAPTIONS, seed=0)
    ids = [f"img{i}" for i in range(N_CAPTIONS)]
    weights = resample_weights(np.random.default_rng(7), N_CAPTIONS, RESAMPLES_EXACT)
    with CaptionScorer() as scorer:
        stats = scorer.score_items(good, refs, ids)
        worse_stats = scorer.score_items(worse, refs, ids)
        gts, res = tokenised(good, refs)
        exact_meteor = np.array([100 * scorer._meteor.compute_score(resampled(gts, w), resampled(res, w))[0]
                                 for w in weights])
    return {"stats": stats, "worse": worse_stats, "gts": gts, "res": res, "weights": weights,
            "exact_meteor": exact_meteor}


def test_full_weights_reproduce_caption_scores(captions):
    stats = captions["stats"]
    assert tuple(stats.scores) == CAPTION_METRICS
    assert stats.columns["bleu_correct"].shape == (N_CAPTIONS, 4)
    values = metric_values(stats, np.ones((1, N_CAPTIONS)))
    for m in CAPTION_METRICS:
        assert values[m][0] == pytest.approx(stats.scores[m], abs=1e-9), m


def test_bleu_and_rouge_on_resamples_equal_pycocoevalcap_rerun(captions):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    weights = captions["weights"][:5]
    values = metric_values(captions["stats"], weights)
    for b, w in enumerate(weights):
        gts, res = resampled(captions["gts"], w), resampled(captions["res"], w)
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for k in range(4):
            assert values[f"bleu_{k + 1}"][b] == pytest.approx(100 * bleu[k], abs=1e-9)
        assert values["rouge_l"][b] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], abs=1e-9)
    # and resamples do move them: a constant would pass the equality above only at W = ones
    assert np.ptp(values["bleu_4"]) > 1


def half_width(values: np.ndarray) -> float:
    low, high = spread(values)
    return (high - low) / 2


# What an approximate interval must do, whatever a given set measures: an interval serves to
# decide (is a difference above 0, a score above a floor?), so an approximation may move an
# endpoint by at most a quarter of the exact interval's half-width (a decision then moves by
# less than a quarter of the uncertainty it is taken under); a conservative one may be wider,
# but never narrower, than the exact interval, and at most twice as wide (wider says little);
# either way it must track the exact resamples one by one (paired comparisons difference
# them), sharing at least half of their variance (r^2 >= 0.5).
ENDPOINT_SHARE, MAX_WIDTH, MIN_R2 = 0.25, 2.0, 0.5


def test_cider_approximation_tracks_exact_recomputation(captions):
    """CIDEr's approximation (document frequencies of the full set) against CIDEr recomputed
    on each resampled corpus: both endpoints within ENDPOINT_SHARE of the exact half-width."""
    from pycocoevalcap.cider.cider import Cider
    stats, weights = captions["stats"], captions["weights"]
    exact = np.array([100 * Cider().compute_score(resampled(captions["gts"], w), resampled(captions["res"], w))[0]
                      for w in weights])
    approx = metric_values(stats, weights)["cider"]
    h = half_width(exact)
    for ours, theirs in zip(spread(approx), spread(exact), strict=True):
        assert abs(ours - theirs) <= ENDPOINT_SHARE * h, (spread(approx), spread(exact))
    assert np.corrcoef(approx, exact)[0, 1] ** 2 >= MIN_R2


def test_meteor_approximation_tracks_exact_recomputation(captions):
    """METEOR's approximation (segment scores, shifted onto the corpus score) is conservative:
    segment scores vary more than the corpus-level aggregate rerun on resamples. So its interval
    holds the exact one (each end at most ENDPOINT_SHARE of the half-width inside it), is at most
    MAX_WIDTH as wide, and is centred on the score (its median within ENDPOINT_SHARE)."""
    stats, exact = captions["stats"], captions["exact_meteor"]
    approx = metric_values(stats, captions["weights"])["meteor"]
    (low, high), (exact_low, exact_high) = spread(approx), spread(exact)
    h = half_width(exact)
    assert low <= exact_low + ENDPOINT_SHARE * h and high >= exact_high - ENDPOINT_SHARE * h, (low, high, h)
    assert (high - low) <= MAX_WIDTH * (exact_high - exact_low)
    assert abs(np.median(approx) - stats.scores["meteor"]) <= ENDPOINT_SHARE * h
    assert np.corrcoef(approx, exact)[0, 1] ** 2 >= MIN_R2


def test_caption_comparison(captions):
    good, worse = captions["stats"], captions["worse"]
    deltas = compare(good, worse, resamples=1000)
    assert set(deltas) == set(CAPTION_METRICS)
    assert deltas["cider"].paired and deltas["cider"].verdict == "better"
    assert deltas["cider"].value == good.scores["cider"] - worse.scores["cider"]
    assert deltas["cider"].low < deltas["cider"].value < deltas["cider"].high
    same = compare(good, good)
    assert all(d.value == d.low == d.high == 0 for d in same.values())


def test_caption_stats_round_trip_through_json(captions):
    stats = captions["stats"]
    back = ItemStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert (back.task, back.ids, back.scores) == (stats.task, stats.ids, stats.scores)
    assert back.columns.keys() == stats.columns.keys()
    for name, column in stats.columns.items():
        assert np.array_equal(back.columns[name], column) and back.columns[name].shape == column.shape
    assert bootstrap(back, resamples=200) == bootstrap(stats, resamples=200)


# ---- VQA and grounding -----------------------------------------------------------------------

def vqa_set(n: int, seed: int, right: float = 0.7) -> tuple[list[str], list[str], list[str]]:
    """Answers, predictions (`right` of them correct) and unbalanced types, one of them rare."""
    rng = random.Random(seed)
    types = [rng.choice(["presence"] * 6 + ["comp"] * 3 + ["count"] * 3) for _ in range(n)]
    types[:3] = ["rural_urban"] * 3  # rare: many resamples lack it
    answers = [rng.choice(["yes", "no"]) if t != "count" else str(rng.randint(0, 9)) for t in types]
    preds = [a if rng.random() < right else "wrong" for a in answers]
    return preds, answers, types


def grounding_set(n: int, hits: int) -> tuple[list[str], list[tuple], list[tuple]]:
    """n answers on 100 x 100 images: `hits` right, then misses, unparseable ones and near misses."""
    boxes = [(0, 0, 50, 50)] * n
    misses = ["{<50><50><100><100>}", "no box", "{<0><0><30><50>}"]  # IoU 0, unparsed, IoU 0.6 -> hit
    preds = ["{<0><0><50><50>}"] * hits + [misses[i % 2] for i in range(n - hits)]
    preds[-1] = misses[2]
    return preds, boxes, [(100, 100)] * n


def test_proportion_interval_matches_normal_approximation():
    """400 items, 70% hits: p +- 1.96 sqrt(p(1-p)/n) = 70 +- 4.49 points. Resampled scores sit on a
    0.25-point grid and each endpoint's Monte Carlo error with 1000 resamples is ~0.2 points, so
    0.75 points (over 200 seeds the largest gap was 0.51)."""
    n, hits = 400, 280
    preds, boxes, sizes = grounding_set(n, hits - 1)  # its last answer is a near miss, i.e. a hit
    stats = grounding_items(preds, boxes, sizes)
    assert stats.scores["acc_at_0.5"] == 70
    vqa = vqa_items(["yes"] * hits + ["no"] * (n - hits), ["yes"] * n, ["presence"] * n)
    half = 100 * 1.96 * math.sqrt(0.7 * 0.3 / n)
    for interval in (bootstrap(stats)["acc_at_0.5"], bootstrap(vqa)["oa"], bootstrap(vqa)["aa"]):
        assert interval.low == pytest.approx(70 - half, abs=0.75)
        assert interval.high == pytest.approx(70 + half, abs=0.75)


def test_full_weights_reproduce_vqa_and_grounding_scores():
    preds, answers, types = vqa_set(300, seed=1)
    vqa = vqa_items(preds, answers, types)
    assert vqa.scores == vqa_scores(preds, answers, types)
    assert {"acc_rural_urban", "acc_count", "aa", "aa_all", "oa"} <= set(vqa.scores)
    grounding = grounding_items(*grounding_set(300, 200))
    assert grounding.scores == grounding_scores(*grounding_set(300, 200))
    for stats in (vqa, grounding):
        values = metric_values(stats, np.ones((1, stats.n)))
        assert values.keys() == stats.scores.keys()
        for m, v in stats.scores.items():
            assert values[m][0] == pytest.approx(v, abs=1e-9), m


def test_vqa_and_grounding_resamples_equal_the_scorers_rerun():
    """Exact on every resample, including ones that lack a type (its accuracy NaN, AA over the
    types present) and one without any of the paper's types (AA falls back to every type)."""
    preds, answers, types = vqa_set(60, seed=2)
    stats = vqa_items(preds, answers, types)
    weights = resample_weights(np.random.default_rng(3), stats.n, 30)
    no_paper_types = np.array([t == "count" for t in types], dtype=float)
    weights = np.vstack([weights, no_paper_types])
    values = metric_values(stats, weights)
    assert np.isnan(values["acc_rural_urban"]).any()  # the rare type is absent from some resamples
    for b, w in enumerate(weights):
        rows = np.repeat(np.arange(stats.n), w.astype(int))
        expected = vqa_scores([preds[i] for i in rows], [answers[i] for i in rows], [types[i] for i in rows])
        for m, v in values.items():
            if m in expected:
                assert v[b] == pytest.approx(expected[m], abs=1e-9), (b, m)
            else:
                assert np.isnan(v[b]), (b, m)
    assert values["aa"][-1] == values["acc_count"][-1]
    g_preds, g_boxes, g_sizes = grounding_set(50, 30)
    grounding = grounding_items(g_preds, g_boxes, g_sizes)
    g_weights = resample_weights(np.random.default_rng(4), 50, 5)
    values = metric_values(grounding, g_weights)
    for b, w in enumerate(g_weights):
        rows = np.repeat(np.arange(50), w.astype(int))
        expected = grounding_scores([g_preds[i] for i in rows], [g_boxes[i] for i in rows], [g_sizes[i] for i in rows])
        for m, v in values.items():
            assert v[b] == pytest.approx(expected[m], abs=1e-9), (b, m)


def test_compare_finds_a_planted_difference():
    preds, answers, types = vqa_set(400, seed=4)
    right = [i for i, (p, a) in enumerate(zip(preds, answers, strict=True)) if p == a]
    flipped = list(preds)
    for i in [i for i in right if types[i] != "rural_urban"][:60]:  # 15% of the items, the rare type's kept
        flipped[i] = "wrong"
    a, b = vqa_items(preds, answers, types), vqa_items(flipped, answers, types)
    deltas = compare(a, b)
    assert deltas["oa"] == Delta(15.0, deltas["oa"].low, deltas["oa"].high, paired=True)
    assert deltas["oa"].verdict == "better" and deltas["aa"].verdict == "better"
    assert deltas["oa"].low < 15 < deltas["oa"].high
    assert compare(b, a)["oa"].verdict == "worse"
    assert deltas["acc_rural_urban"].value == 0 and deltas["acc_rural_urban"].verdict == "no significant difference"


def test_compare_flags_nothing_without_a_real_difference():
    preds, answers, types = vqa_set(400, seed=5)
    a = vqa_items(preds, answers, types)
    same = compare(a, vqa_items(preds, answers, types))
    assert all(d.value == d.low == d.high == 0 and d.verdict == "no significant difference" for d in same.values())
    nudged = list(preds)
    for i in [i for i, (p, a) in enumerate(zip(preds, answers, strict=True)) if p != a][:2]:
        nudged[i] = answers[i]  # 2 items of 400 now right
    deltas = compare(vqa_items(nudged, answers, types), a)
    assert deltas["oa"].value == 0.5 and deltas["oa"].verdict == "no significant difference"
    assert all(d.verdict == "no significant difference" for d in deltas.values())


def test_compare_pairs_on_the_shared_items_else_resamples_independently():
    preds, boxes, sizes = grounding_set(400, 280)
    full = grounding_items(preds, boxes, sizes, ids=[f"g{i}" for i in range(400)])
    # a superset pairs on the smaller set's items, in its order
    some = [f"g{i}" for i in range(399, 0, -2)]
    half = full.subset(some)
    deltas = compare(half, full)
    assert all(d.paired and d.value == 0 and d.low == d.high == 0 for d in deltas.values())
    assert compare(full, half) == compare(full.subset(some), half)
    # different items: unpaired, so the variances add: sqrt(2) times one set's normal-approximation
    # interval (both sets 70% hits of 400), within the 0.75 points each endpoint may miss by
    # (test_proportion_interval_matches_normal_approximation)
    other = grounding_items(preds, boxes, sizes, ids=[f"h{i}" for i in range(400)])
    delta = compare(full, other)["acc_at_0.5"]
    assert not delta.paired and delta.value == 0 and delta.verdict == "no significant difference"
    half = 100 * 1.96 * math.sqrt(2 * 0.7 * 0.3 / 400)
    assert delta.low == pytest.approx(-half, abs=0.75) and delta.high == pytest.approx(half, abs=0.75)
    with pytest.raises(ValueError, match="'grounding'.*'vqa'"):
        compare(full, vqa_items(["yes"], ["yes"], ["presence"]))


def test_subset_rescores_and_names_missing_ids():
    preds, answers, types = vqa_set(100, seed=6)
    stats = vqa_items(preds, answers, types, ids=[f"q{i}" for i in range(100)])
    rows = list(range(10, 60))  # without the rare type (items 0-2)
    part = stats.subset([f"q{i}" for i in rows])
    assert part.scores == pytest.approx(vqa_scores(*[[x[i] for i in rows] for x in (preds, answers, types)]))
    assert "acc_rural_urban" not in part.scores and "type.rural_urban" not in part.columns
    assert part.ids == [f"q{i}" for i in rows]
    with pytest.raises(KeyError, match="ghost"):
        stats.subset(["q1", "ghost"])
    with pytest.raises(ValueError, match="ItemStats.ids: repeated"):
        stats.subset(["q1", "q1"])


def test_vqa_stats_round_trip_through_json():
    preds, answers, types = vqa_set(50, seed=7)
    stats = vqa_items(preds, answers, types, ids=[f"q{i}" for i in range(49)] + [49])
    back = ItemStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert (back.task, back.ids, back.scores) == (stats.task, stats.ids, stats.scores)
    assert all(np.array_equal(back.columns[k], v) for k, v in stats.columns.items())


def test_same_seed_same_intervals():
    stats = vqa_items(*vqa_set(200, seed=8))
    assert bootstrap(stats, seed=3) == bootstrap(stats, seed=3)
    assert bootstrap(stats, seed=3) != bootstrap(stats, seed=4)
    other = vqa_items(*vqa_set(200, seed=9))
    assert compare(stats, other, seed=3) == compare(stats, other, seed=3)
    with pytest.raises(ValueError, match="level"):
        bootstrap(stats, level=95)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap(stats, resamples=0)
