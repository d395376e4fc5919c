"""Bootstrap confidence intervals for every evaluation metric, and paired bootstrap comparisons
of two systems (pure numpy: no torch, no MLflow).

A scorer of `skyeye.evaluation.metrics` returns an `ItemStats`: per-item additive statistics
(`columns`) beside the exact scores. A bootstrap resample is a weight vector (how many times
each item was drawn), so every statistic of B resamples is one product `W @ column` with W of
shape (B, n), and the metrics are recomputed from those weighted sums: no Python loop over
resamples, no pycocoevalcap call. Intervals are percentile intervals.

Exact on every resample (equal to the scorer run on the resampled items): VQA (`acc_<type>`,
`aa`, `aa_all`, `oa`), grounding (`acc_at_0.5`, `parsed`, `mean_iou`), BLEU-1..4 (corpus-level:
pycocoevalcap's own aggregation of the summed n-gram matches, n-gram counts and lengths,
smoothing constants and brevity penalty included) and ROUGE-L (a mean of per-item scores).

Approximated:
- CIDEr-D: a resample's score is the mean of per-item CIDEr computed with the document
  frequencies of the full test set, whereas rescoring a resampled corpus would recount them
  on its references, duplicated images included (which lowers their n-grams' weights: exact
  resamples score ~2.5% lower at 40 items, ~0.7% at 150). Exact on the full set; on synthetic
  sets the interval widths agree within 10% and the endpoints within 5.5% of the score at
  40 items, 1.5% at 150 (tests/test_intervals.py).
- METEOR: the Java scorer's corpus score comes from statistics aggregated over segments (not the
  mean of its segment scores). A resample's METEOR is the corpus score shifted by how far the
  resample's mean segment score is from the full set's: corpus + (resampled mean - full mean).
  Exact on the full set by construction. Segment scores vary more than the aggregate, so the
  interval is conservative: 1.3-1.6 x as wide as METEOR rerun on resamples, endpoints within
  ~9% of the score at 40 items, ~3% at 150 (tests/test_intervals.py).
- `ItemStats.subset` to fewer items recomputes the scores from the columns, so it inherits both
  approximations: CIDEr keeps the full set's document frequencies and METEOR is shifted as above.
  A comparison of a system scored on a subset against one scored on the full set therefore
  mixes two document-frequency bases in CIDEr; score both on the same items for an exact one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

from ..formats.benchmarks import AA, AA_ALL, ACC_AT_05, OA

TASKS = ("caption", "vqa", "grounding")
BLEU_N = 4
# pycocoevalcap's BLEU smoothing: `small` pads n-gram and reference counts, `tiny` matches and lengths
BLEU_SMALL, BLEU_TINY = 1e-9, 1e-15
TYPE_PREFIX = "type."  # VQA: one 0/1 column per question type, `type.<name>`


# The bootstrap's settings, for every config that holds them (evaluation, promotion, ablation)
RESAMPLES = 1000
LEVEL = 0.95
Resamples = Annotated[int, Field(ge=100, description="Bootstrap resamples per interval (seeded: reruns agree).")]
Level = Annotated[float, Field(gt=0.5, lt=1.0, description="The intervals' coverage.")]


@dataclass(frozen=True)
class ItemStats:
    """One scored set: item ids in row order, per-item additive statistics and the exact scores.

    Columns (x1 scale; the metrics are x100):
    caption: `bleu_testlen`, `bleu_reflen` (closest reference length), `bleu_guess` and
        `bleu_correct` (n, 4) (n-gram counts and clipped matches), `meteor` (segment score; absent
        when scored without METEOR), `rouge_l`, `cider` (per-item scores);
    vqa: `hit`, `paper_type` (the item's type counts in AA), `type.<name>` (one-hot);
    grounding: `hit` (IoU > 0.5), `parsed`, `iou`.
    """
    task: str
    ids: list
    columns: dict[str, np.ndarray]
    scores: dict[str, float]

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"ItemStats.task: {self.task!r} is none of {TASKS}")
        object.__setattr__(self, "ids", list(self.ids))
        object.__setattr__(self, "columns", {k: np.asarray(v, dtype=np.float64) for k, v in self.columns.items()})
        if not self.ids:
            raise ValueError("ItemStats.ids: no items")
        if len(set(self.ids)) != len(self.ids):
            seen: set = set()
            twice = [i for i in self.ids if i in seen or seen.add(i)]
            raise ValueError(f"ItemStats.ids: repeated ids {twice[:10]}")
        wrong = {k: v.shape for k, v in self.columns.items() if v.ndim not in (1, 2) or len(v) != len(self.ids)}
        if wrong:
            raise ValueError(f"ItemStats.columns: shapes {wrong} do not fit {len(self.ids)} ids")

    @property
    def n(self) -> int:
        return len(self.ids)

    def subset(self, ids) -> ItemStats:
        """The rows of `ids`, in that order; scores recomputed on them (see the module docstring)."""
        ids = list(ids)
        row_of = {item: row for row, item in enumerate(self.ids)}
        missing = [i for i in ids if i not in row_of]
        if missing:
            raise KeyError(f"ItemStats.subset: ids not among the {self.n} {self.task} items: {missing[:10]}")
        rows = np.array([row_of[i] for i in ids], dtype=np.intp)
        columns = {k: v[rows] for k, v in self.columns.items()}
        if len(set(ids)) == self.n:  # the same items, reordered: the scores stand as they are
            return ItemStats(self.task, ids, columns, dict(self.scores))
        chosen = np.bincount(rows, minlength=self.n)[None, :].astype(np.float64)
        scores = {m: float(v[0]) for m, v in metric_values(self, chosen).items() if not np.isnan(v[0])}
        # a question type none of these items has is no metric of the subset
        columns = {k: v for k, v in columns.items() if not k.startswith(TYPE_PREFIX) or v.any()}
        return ItemStats(self.task, ids, columns, scores)

    def to_json(self) -> dict:
        return {"task": self.task, "ids": list(self.ids), "scores": {k: float(v) for k, v in self.scores.items()},
                "columns": {k: v.tolist() for k, v in self.columns.items()}}

    @classmethod
    def from_json(cls, d: dict) -> ItemStats:
        return cls(d["task"], d["ids"], {k: np.asarray(v, dtype=np.float64) for k, v in d["columns"].items()},
                   dict(d["scores"]))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class Delta:
    """a - b: `value` on all items compared, [low, high] its bootstrap interval."""
    value: float
    low: float
    high: float
    paired: bool  # False: the two were scored on different items, resampled independently

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    """What a difference's interval says: better when it lies wholly above 0, worse when wholly below."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant difference"


def bootstrap(stats: ItemStats, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
              ) -> dict[str, Interval]:
    """A percentile interval for every metric of `stats.scores`."""
    _check(resamples, level)
    values = metric_values(stats, resample_weights(np.random.default_rng(seed), stats.n, resamples))
    return {m: Interval(*_percentiles(v, level)) for m, v in values.items()}


def compare(a: ItemStats, b: ItemStats, resamples: int = RESAMPLES, seed: int = 0,
            level: float = LEVEL) -> dict[str, Delta]:
    """a - b for every metric both have. Paired (the same resampled items for both) on a's items
    when b holds all of them (b's scores are then those on a's items) or on b's when a holds all
    of b's; otherwise the two are resampled independently (`paired=False`)."""
    if a.task != b.task:
        raise ValueError(f"compare: a is a {a.task!r} ItemStats, b a {b.task!r} one")
    _check(resamples, level)
    a, b, va, vb, paired = resampled_pair(a, b, resamples, seed)
    out = {}
    for m in a.scores:
        if m in b.scores:
            low, high = _percentiles(va[m] - vb[m], level)
            out[m] = Delta(float(a.scores[m] - b.scores[m]), low, high, paired)
    return out


def resampled_pair(a: ItemStats, b: ItemStats, resamples: int, seed: int
                   ) -> tuple[ItemStats, ItemStats, dict[str, np.ndarray], dict[str, np.ndarray], bool]:
    """(a, b on the items compared, a's and b's metrics on each resample, paired): the same
    resampled items for both when one's items hold the other's, else independent resamples."""
    rng = np.random.default_rng(seed)
    paired = set(a.ids) <= set(b.ids) or set(b.ids) <= set(a.ids)
    if paired:
        a, b = (a, b.subset(a.ids)) if set(a.ids) <= set(b.ids) else (a.subset(b.ids), b)
        wa = wb = resample_weights(rng, a.n, resamples)
    else:
        wa, wb = resample_weights(rng, a.n, resamples), resample_weights(rng, b.n, resamples)
    return a, b, metric_values(a, wa), metric_values(b, wb), paired


def resample_weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how many times each of n items is drawn in each resample of n draws."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def metric_values(stats: ItemStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of `stats.scores` on each row of `weights` (B, n): item counts of a resample
    (all ones: the full set). NaN where a resample lacks a VQA question type."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != stats.n:
        raise ValueError(f"metric_values: weights have {weights.shape[1]} columns for {stats.n} items")
    values = {"caption": _caption_values, "vqa": _vqa_values, "grounding": _grounding_values}[stats.task](
        stats, weights)
    return {m: values[m] for m in stats.scores}


# ---- the metrics from weighted sums --------------------------------------------------------

def _mean(weights: np.ndarray, column: np.ndarray) -> np.ndarray:
    return weights @ column / weights.sum(axis=1)


def bleu_from_sums(testlen, reflen, guess, correct) -> np.ndarray:
    """BLEU-1..4 (x1), shape (..., 4), from summed lengths (...,) and n-gram counts (..., 4):
    pycocoevalcap's `BleuScorer.compute_score` aggregation, operation for operation."""
    precisions = np.cumprod((correct + BLEU_TINY) / (guess + BLEU_SMALL), axis=-1)
    bleu = precisions ** (1.0 / np.arange(1, BLEU_N + 1))
    ratio = (testlen + BLEU_TINY) / (reflen + BLEU_SMALL)
    brevity = np.exp(1 - 1 / np.minimum(ratio, 1.0))  # exp(0) = 1 when the hypotheses are long enough
    return bleu * np.where(ratio < 1, brevity, 1.0)[..., None]


def _caption_values(stats: ItemStats, w: np.ndarray) -> dict[str, np.ndarray]:
    c = stats.columns
    bleu = 100 * bleu_from_sums(w @ c["bleu_testlen"], w @ c["bleu_reflen"], w @ c["bleu_guess"],
                                w @ c["bleu_correct"])
    out = {f"bleu_{k + 1}": bleu[:, k] for k in range(BLEU_N)}
    if "meteor" in c:  # shifted onto the Java's corpus score (module docstring)
        out["meteor"] = stats.scores["meteor"] + 100 * (_mean(w, c["meteor"]) - c["meteor"].mean())
    out["rouge_l"] = 100 * _mean(w, c["rouge_l"])
    out["cider"] = 100 * _mean(w, c["cider"])
    return out


def _vqa_values(stats: ItemStats, w: np.ndarray) -> dict[str, np.ndarray]:
    c = stats.columns
    types = [k[len(TYPE_PREFIX):] for k in c if k.startswith(TYPE_PREFIX)]
    onehot = np.stack([c[TYPE_PREFIX + t] for t in types], axis=1)  # (n, k)
    counts = w @ onehot
    hits = w @ (onehot * c["hit"][:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, 100 * hits / counts, np.nan)
    present = counts > 0
    paper = (onehot * c["paper_type"][:, None]).any(axis=0)  # (k,): the type counts in AA
    in_aa = present & paper
    in_aa = np.where(in_aa.any(axis=1, keepdims=True), in_aa, present)  # none present: every type (the scorer's rule)
    out = {f"acc_{t}": acc[:, j] for j, t in enumerate(types)}
    out[AA] = np.where(in_aa, acc, 0.0).sum(axis=1) / in_aa.sum(axis=1)
    out[AA_ALL] = np.where(present, acc, 0.0).sum(axis=1) / present.sum(axis=1)
    out[OA] = 100 * _mean(w, c["hit"])
    return out


def _grounding_values(stats: ItemStats, w: np.ndarray) -> dict[str, np.ndarray]:
    c = stats.columns
    return {ACC_AT_05: 100 * _mean(w, c["hit"]), "parsed": 100 * _mean(w, c["parsed"]),
            "mean_iou": 100 * _mean(w, c["iou"])}


# ---- intervals -----------------------------------------------------------------------------

def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples: {resamples}, needs at least 1")
    if not 0 < level < 1:
        raise ValueError(f"level: {level}, needs to lie strictly between 0 and 1")


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` percentile interval, ignoring NaN resamples (a VQA type drawn 0 times)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)
