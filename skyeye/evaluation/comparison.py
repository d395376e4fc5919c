"""Two evaluations compared item by item, with no model re-run: each evaluation run keeps
the per-item statistics of the model and of its baselines (`item_stats/<bench_split>.json`,
written by the runner), so any two runs on the same test items give a paired bootstrap of
their difference on every metric, and of the difference of their primary scores.

Used by the promotion policy (a candidate against the version production holds) and by
`skyeye models VERSION`. Runs evaluated before per-item statistics were kept have none:
`compare_runs` then returns None and callers fall back to comparing the point scores.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import Settings
from ..formats.benchmarks import ALL_KEYS, PRIMARY, TASK_OF
from ..tracking import runs
from .intervals import LEVEL, RESAMPLES, Delta, ItemStats, compare, resampled_pair

ITEM_STATS = "item_stats"  # artifact folder of an evaluation run
MODEL = "model"  # the scored model's entry in an item_stats file; baselines are "baseline.<name>"


def save_item_stats(run_id: str, stats: dict[str, dict[str, ItemStats]], settings: Settings | None = None) -> None:
    """`{bench_split: {"model" | "baseline.<name>": ItemStats}}` into the run's artifacts."""
    client = runs.client(settings)
    with tempfile.TemporaryDirectory() as tmp:
        for key, by_name in stats.items():
            (Path(tmp) / f"{key}.json").write_text(
                json.dumps({name: s.to_json() for name, s in by_name.items()}), encoding="utf-8")
        client.log_artifacts(run_id, tmp, ITEM_STATS)


def load_item_stats(run_id: str, settings: Settings | None = None) -> dict[str, dict[str, ItemStats]]:
    """What `save_item_stats` wrote ({} for a run evaluated before per-item statistics were kept)."""
    client = runs.client(settings)
    names = [f.path for f in client.list_artifacts(run_id, ITEM_STATS)]
    if not names:
        return {}
    out: dict[str, dict[str, ItemStats]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, ITEM_STATS, tmp))
        for path in sorted(folder.glob("*.json")):
            raw = json.loads(path.read_text(encoding="utf-8"))
            out[path.stem] = {name: ItemStats.from_json(d) for name, d in raw.items()}
    return out


@dataclass(frozen=True)
class SplitComparison:
    key: str
    metric: str  # the split's primary metric
    ours: float
    theirs: float
    delta: Delta

    def line(self) -> str:
        d = self.delta
        return (f"{self.key}/{self.metric} {self.ours:.1f} vs {self.theirs:.1f}: {d.value:+.1f} "
                f"[{d.low:+.1f}, {d.high:+.1f}] {d.verdict}")


@dataclass(frozen=True)
class RunComparison:
    """The candidate (`ours`) against a reference run, per bench split and on the primary score."""
    splits: dict[str, SplitComparison]
    primary: Delta | None  # primary_score difference (mean over the splits both scored)
    level: float

    def record(self) -> dict:
        """JSON-ready, for a decision record: per split the difference, its interval and verdict."""
        out = {f"{c.key}/{c.metric}": {"delta": round(c.delta.value, 3), "low": round(c.delta.low, 3),
                                      "high": round(c.delta.high, 3), "verdict": c.delta.verdict,
                                      "paired": c.delta.paired} for c in self.splits.values()}
        if self.primary is not None:
            p = self.primary
            out["primary_score"] = {"delta": round(p.value, 3), "low": round(p.low, 3), "high": round(p.high, 3),
                                    "verdict": p.verdict, "paired": p.paired}
        return out


def compare_stats(ours: dict[str, ItemStats], theirs: dict[str, ItemStats], resamples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> RunComparison:
    """Per bench split (the splits both have), the primary metric's paired difference; and the
    primary score's, whose resamples are the mean over splits of each split's resampled difference
    (the splits' test items are independent, so each split gets its own resample seed)."""
    splits: dict[str, SplitComparison] = {}
    draws = []
    for i, key in enumerate(k for k in ALL_KEYS if k in ours and k in theirs):
        name = PRIMARY[TASK_OF[key]]
        delta = compare(ours[key], theirs[key], resamples, seed + i, level)[name]
        splits[key] = SplitComparison(key, name, ours[key].scores[name], theirs[key].scores[name], delta)
        draws.append(_difference_draws(ours[key], theirs[key], name, resamples, seed + i))
    primary = None
    if splits:
        mean = np.mean(np.stack(draws), axis=0)
        tail = (1 - level) / 2 * 100
        low, high = np.nanpercentile(mean, [tail, 100 - tail])
        value = float(np.mean([c.delta.value for c in splits.values()]))
        primary = Delta(value, float(low), float(high), all(c.delta.paired for c in splits.values()))
    return RunComparison(splits, primary, level)


def _difference_draws(a: ItemStats, b: ItemStats, name: str, resamples: int, seed: int) -> np.ndarray:
    """The resampled differences a - b of metric `name`, drawn as `compare` draws them: what the
    primary score's interval averages over splits."""
    _, _, va, vb, _ = resampled_pair(a, b, resamples, seed)
    return va[name] - vb[name]


def compare_runs(ours_run: str, theirs_run: str, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                 settings: Settings | None = None, same_items: bool = True) -> RunComparison | None:
    """The model of evaluation run `ours_run` against the model of `theirs_run`; None when
    either run kept no per-item statistics. `same_items=False` (the runs scored different
    data versions, whose item ids may coincide without being the same items): unpaired."""
    ours, theirs = load_item_stats(ours_run, settings), load_item_stats(theirs_run, settings)
    if not ours or not theirs:
        return None
    theirs_model = {k: v[MODEL] for k, v in theirs.items() if MODEL in v}
    if not same_items:
        theirs_model = {k: replace(s, ids=[f"{theirs_run}:{i}" for i in s.ids]) for k, s in theirs_model.items()}
    return compare_stats({k: v[MODEL] for k, v in ours.items() if MODEL in v}, theirs_model, resamples, seed, level)
