"""The production gate decides on intervals: constructed prediction tables whose right
decision is known (a large real gain, a small noisy one, a real regression hidden behind a
better average, a fall on a small noisy split), scored by the metric code, compared item by
item and judged by `policy_failures`. Likewise the approval of a task: the model against
its trivial baseline on every split of the task, scored and compared as the evaluation does."""
from __future__ import annotations

import numpy as np
import pytest

from skyeye.evaluation.baselines import TRIVIAL, approved_tasks, trivial_verdicts
from skyeye.evaluation.comparison import MODEL, compare_stats
from skyeye.evaluation.metrics import grounding_items, vqa_items
from skyeye.evaluation.runner import EvalConfig, with_intervals
from skyeye.formats.benchmarks import EVAL_KEYS, PRIMARY, TASK_OF
from skyeye.registry.promotion import PromotionPolicy, policy_failures

# VQA and grounding splits: their metrics need no Java, and they cover both kinds of primary metric
KEYS = [k for k in EVAL_KEYS if TASK_OF[k] in ("vqa", "grounding")]
N = 400
BOX, SIZE = (10, 10, 50, 50), (100, 100)
# the comparison with production on its own (the approval has its own tests, at the end)
POLICY = PromotionPolicy.model_validate({"staging": {"require_all_benchmarks": False, "require_validation": False,
                                                     "require_approved_task": False},
                                         "production": {"tolerances": {"vqa": 3.0, "grounding": 3.0}}})


def predictions(key: str, right: np.ndarray):
    """A split's per-item statistics when exactly the items in `right` are answered correctly."""
    ids = [f"{key}-{i}" for i in range(N)]
    if TASK_OF[key] == "vqa":
        types = ["presence" if i % 2 else "comp" for i in range(N)]
        return vqa_items(["yes" if r else "no" for r in right], ["yes"] * N, types, ids=ids)
    hit, miss = "{<10><10><50><50>}", "{<60><60><90><90>}"
    return grounding_items([hit if r else miss for r in right], [BOX] * N, [SIZE] * N, ids=ids)


def right_share(share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    right = np.zeros(N, dtype=bool)
    right[rng.choice(N, int(round(share * N)), replace=False)] = True
    return right


def judge(ours: dict, theirs: dict, policy: PromotionPolicy = POLICY) -> list[str]:
    comparison = compare_stats(ours, theirs)
    metrics = {f"{k}/{PRIMARY[TASK_OF[k]]}": s.scores[PRIMARY[TASK_OF[k]]] for k, s in ours.items()}
    held = {f"{k}/{PRIMARY[TASK_OF[k]]}": s.scores[PRIMARY[TASK_OF[k]]] for k, s in theirs.items()}
    return policy_failures("production", metrics, policy, None, None, 7, held, comparison)


@pytest.fixture(scope="module")
def production():
    return {k: right_share(0.6, i) for i, k in enumerate(KEYS)}


def flip(right: np.ndarray, n: int, to: bool, seed: int) -> np.ndarray:
    """`right` with `n` items that were not `to` turned to `to`."""
    out = right.copy()
    candidates = np.flatnonzero(out != to)
    out[np.random.default_rng(seed).choice(candidates, n, replace=False)] = to
    return out


def stats(rights: dict) -> dict:
    return {k: predictions(k, r) for k, r in rights.items()}


def test_a_large_real_gain_is_promoted(production):
    better = {k: flip(r, 60, True, 1) for k, r in production.items()}  # +15 points on every split
    assert judge(stats(better), stats(production)) == []


def test_a_small_noisy_gain_is_not_enough_for_production(production):
    # on every split 20 answers turn right and 18 others wrong: +0.5 points, within the churn
    noisy = {k: flip(flip(r, 20, True, 2), 18, False, 5) for k, r in production.items()}
    failures = judge(stats(noisy), stats(production))
    assert len(failures) == 1 and "primary_score" in failures[0] and "not significantly better" in failures[0]
    # where the policy asks only for not significantly worse, the same candidate passes
    lenient = POLICY.model_copy(update={"production": POLICY.production.model_copy(update={"primary": "not_worse"})})
    assert judge(stats(noisy), stats(production), lenient) == []


def test_a_real_regression_hidden_behind_a_better_average_is_refused(production):
    hidden = {k: flip(r, 60, True, 3) for k, r in production.items()}
    bad = "rsvg_test"
    hidden[bad] = flip(production[bad], 80, False, 4)  # -20 points on 400 items
    ours, theirs = stats(hidden), stats(production)
    gain = np.mean([ours[k].scores[PRIMARY[TASK_OF[k]]] - theirs[k].scores[PRIMARY[TASK_OF[k]]] for k in KEYS])
    assert gain > 5  # the average is much better ...
    failures = judge(ours, theirs)
    assert len(failures) == 1, failures  # ... and only the regressed split is named, with its numbers and the rule
    assert failures[0].startswith("rsvg_test/acc_at_0.5 40.0 vs production v7 60.0: -20.0, 95% interval [")
    assert "lies wholly below -3" in failures[0] and "tolerance of 3" in failures[0]


def test_a_fall_within_the_noise_of_a_small_split_is_no_regression():
    """The Sydney case: a split falls by more than its tolerance on few items, but its interval
    reaches above -tolerance, so it is noise; a point gate would have refused."""
    small = 30
    key = "rsvg_val"
    ids = [f"x{i}" for i in range(small)]
    theirs = grounding_items(["{<10><10><50><50>}"] * 15 + ["{<60><60><90><90>}"] * 15, [BOX] * small,
                             [SIZE] * small, ids=ids)
    ours = grounding_items(["{<10><10><50><50>}"] * 13 + ["{<60><60><90><90>}"] * 17, [BOX] * small,
                           [SIZE] * small, ids=ids)
    comparison = compare_stats({key: ours}, {key: theirs})
    d = comparison.splits[key].delta
    assert d.value == pytest.approx(-100 * 2 / 30) and d.low < -3 < d.high  # -6.7 points, interval crosses -3
    metrics, held = {f"{key}/acc_at_0.5": ours.scores["acc_at_0.5"]}, {f"{key}/acc_at_0.5": theirs.scores["acc_at_0.5"]}
    interval_failures = policy_failures("production", metrics, POLICY, None, None, 7, held, comparison)
    point_failures = policy_failures("production", metrics, POLICY, None, None, 7, held, None)
    assert not any(key in f for f in interval_failures)
    assert any(f.startswith(f"{key}/acc_at_0.5 43.3 < production 50.0 - 3.0 tolerance") for f in point_failures)


def test_identical_predictions_are_no_difference(production):
    comparison = compare_stats(stats(production), stats(production))
    assert all(c.delta.value == 0 and c.delta.low == 0 and c.delta.high == 0 for c in comparison.splits.values())
    assert comparison.primary.verdict == "no significant difference"
    record = comparison.record()
    assert record["primary_score"]["verdict"] == "no significant difference" and set(KEYS) <= {
        k.split("/")[0] for k in record}


# ------------------------------------------------------------------ approval against the trivial baselines
def evaluated(shares: dict[str, tuple[float, float]]) -> dict[str, float]:
    """An evaluation run's metrics: per bench split (the model's, the trivial baseline's) share of
    right answers, scored with intervals and compared item by item as the evaluation does."""
    metrics = {}
    for i, (key, (ours, theirs)) in enumerate(shares.items()):
        stats = {MODEL: predictions(key, right_share(ours, i)),
                 f"baseline.{TRIVIAL[TASK_OF[key]]}": predictions(key, right_share(theirs, 100 + i))}
        metrics |= with_intervals(key, stats, EvalConfig())
    return metrics


CLEAR = (0.8, 0.5)  # 30 points above the baseline on 400 items: significantly better


@pytest.mark.parametrize("dior, verdict, approved", [
    (CLEAR, "better", ["vqa", "grounding"]),
    ((0.52, 0.5), "no significant difference", ["vqa"]),  # n.s. on one grounding split
    ((0.3, 0.5), "worse", ["vqa"]),  # below the centred box on one grounding split
])
def test_a_task_is_approved_only_when_every_split_is_significantly_better(dior, verdict, approved):
    run = evaluated({k: dior if k == "dior_rsvg_test" else CLEAR for k in KEYS})
    verdicts = trivial_verdicts(run)
    assert verdicts["grounding"] == {"rsvg_val": "better", "rsvg_test": "better", "dior_rsvg_test": verdict}
    assert set(verdicts["vqa"].values()) == {"better"} and set(verdicts["caption"].values()) == {"not evaluated"}
    assert approved_tasks(run) == approved  # captioning was not evaluated: never approved


def test_a_split_without_its_baseline_approves_nothing():
    run = evaluated({k: CLEAR for k in KEYS if k != "rsvqa_hr_test_phili"})
    assert trivial_verdicts(run)["vqa"]["rsvqa_hr_test_phili"] == "not evaluated"
    assert approved_tasks(run) == ["grounding"]


APPROVING = PromotionPolicy.model_validate({"staging": {"require_all_benchmarks": False,
                                                        "require_validation": False}})


def test_staging_needs_one_approved_task():
    worse_vqa = {k: (0.3, 0.5) if k == "rsvqa_lr_test" else CLEAR for k in KEYS if TASK_OF[k] == "vqa"}
    none = evaluated(worse_vqa | {k: (0.52, 0.5) if k == "rsvg_val" else CLEAR for k in KEYS
                                  if TASK_OF[k] == "grounding"})
    assert approved_tasks(none) == []
    (failure,) = policy_failures("staging", none, APPROVING, None, None)
    assert failure.startswith("approved for no task (caption: ucm_captions_test not evaluated")
    assert "vqa: rsvqa_lr_test worse;" in failure and "grounding: rsvg_val no significant difference)" in failure
    # production checks it too, with or without a holder
    assert failure in policy_failures("production", none, APPROVING, None, None)
    # the switch turns it off
    assert policy_failures("staging", none, POLICY, None, None) == []
    one = evaluated({k: CLEAR for k in KEYS if TASK_OF[k] == "grounding"})
    assert approved_tasks(one) == ["grounding"] and policy_failures("staging", one, APPROVING, None, None) == []
