"""The policy that moves the aliases `staging` / `production` of SkyEyeGPT in the MLflow
model registry (configs/promotion.yaml), and the moves themselves: `promote` (checked
against the policy, or forced with a recorded reason) and `rollback`.

Apart from `store` because the policy and its records are a component of their own; this
module reads versions, aliases and evaluation runs through `store` and `model.references`
(which never import it). Every decision is one record (a JSON tag) on the version it
concerns: a promotion's written before the alias moves, a refusal's or a rollback's likewise,
under the registry's lock (`store.lock`: on a tracking server one that every machine sees):
of two promotions at once, the second waits, then judges its candidate against the version
the first put there.

Production decides on intervals, not bare tolerances: the candidate's and production's
evaluations are compared item by item (a paired bootstrap on the same test items,
`evaluation.comparison`). A split regresses only when the whole interval of its difference
lies below minus its tolerance; the primary score must be significantly better (or, where
the policy says so, not significantly worse). Versions evaluated before per-item statistics
were kept are compared on their point scores, as the record says.

Both aliases need a version approved for at least one task (`baselines.approved_tasks`: its
primary metric significantly above the task's trivial baseline on every split of the task),
so a model worse than guessing never ships; which tasks, the version's tag says.

Production can also require a clean canary (policy `canary.require`): the candidate served
beside production on live traffic, its error rate and latency no worse than production's
beyond the tolerances, over enough requests of the inference log (`monitoring.canary`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import get_settings, load_yaml_config
from ..datagate.gate import validation_outcome
from ..evaluation.baselines import TRIVIAL, approved_tasks, trivial_verdicts
from ..evaluation.comparison import RunComparison, compare_runs
from ..evaluation.intervals import LEVEL, RESAMPLES, Level, Resamples, verdict
from ..formats.benchmarks import (
    EVAL_KEYS,
    PRIMARY,
    PRIMARY_SCORE,
    TASK_OF,
    TASKS,
    ci_bounds,
    delta_metric,
    primary_metric,
    primary_of,
)
from ..formats.licences import forbidden
from ..model.references import RegistryError, aliases, model_name, resolve_version, version_exists
from ..monitoring.canary import CanaryTolerance, canary_report
from ..monitoring.log_schema import read_log
from ..tracking import runs
from ..tracking.names import (
    IMPORTED_DATA,
    PROMOTION,
    REFUSAL,
    ROLLBACK,
    TAG_APPROVED_TASKS,
    TAG_DVC_MD5,
    TAG_EVAL_RUN,
    UNVERSIONED,
    read_licences,
    read_records,
    record_tag,
)
from .store import ALIASES, eval_metrics, lock, now, primary_score, user


class PromotionRefused(RegistryError):
    def __init__(self, version: int, alias: str, failures: list[str]):
        self.version, self.alias, self.failures = version, alias, failures
        super().__init__(f"version {version} refused for {alias}:\n" + "\n".join(f"  - {f}" for f in failures)
                         + "\n(override with --force --reason TEXT; the override is recorded on the version)")


# ------------------------------------------------------------------ policy
def _known_tasks(v: dict) -> dict:
    bad = [t for t in v if t not in PRIMARY]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; known: {', '.join(PRIMARY)}")
    return v


class StagingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    require_validation: bool = True
    require_all_benchmarks: bool = True
    # at least one task approved: significantly above its trivial baseline on every split of the task
    require_approved_task: bool = True
    floor: float = 0.0
    task_floors: dict[str, float] = {}
    floors: dict[str, float] = {}

    @field_validator("task_floors")
    @classmethod
    def _tasks(cls, v: dict) -> dict:
        return _known_tasks(v)

    @field_validator("floors")
    @classmethod
    def _keys(cls, v: dict) -> dict:
        bad = [k for k in v if k not in EVAL_KEYS]
        if bad:
            raise ValueError(f"unknown benchmark(s) {bad}; known: {', '.join(EVAL_KEYS)}")
        return v

    def floor_of(self, key: str) -> float:
        return self.floors.get(key, self.task_floors.get(TASK_OF[key], self.floor))


class ProductionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # a split regresses when the whole interval of its difference to production lies below -tolerance
    tolerance: float = Field(2.0, ge=0)
    tolerances: dict[str, float] = {}
    # primary_score against production: "better" = significantly better (the interval's low end
    # above min_primary_gain), "not_worse" = not significantly worse (its high end at or above 0)
    primary: Literal["better", "not_worse"] = "better"
    min_primary_gain: float = 0.0
    resamples: Resamples = RESAMPLES
    level: Level = LEVEL

    @field_validator("tolerances")
    @classmethod
    def _tasks(cls, v: dict) -> dict:
        return _known_tasks(v)

    def tolerance_of(self, key: str) -> float:
        return self.tolerances.get(TASK_OF[key], self.tolerance)


class LicencePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # licences (as the data card writes them, e.g. "CC BY-NC 4.0") that production may not carry in any
    # source of the version's data; matched ignoring case; empty: off
    forbid: list[str] = []


class CanaryPolicy(CanaryTolerance):
    # true: production refuses a version without a clean canary report against the current production
    require: bool = False


class PromotionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    staging: StagingPolicy = StagingPolicy()
    production: ProductionPolicy = ProductionPolicy()
    licences: LicencePolicy = LicencePolicy()
    canary: CanaryPolicy = CanaryPolicy()


def canary_failures(version: int, holder: int, policy: CanaryPolicy) -> list[str]:
    """Why the canary of `version` against production `holder` is not clean, from the inference
    log's last `window_days`; [] = clean."""
    since = datetime.now(UTC) - timedelta(days=policy.window_days)
    log = read_log(get_settings().inference_log_store, since=since)
    report = canary_report(log, policy, candidate=version, production=holder)
    return [f"canary vs production v{holder}: {f} (rule: canary.require)" for f in report.failures]


def load_policy(path: str | Path | None = None) -> PromotionPolicy:
    """The project's policy file (Settings.promotion_policy), else the one shipped beside this package."""
    if path is None:
        s = get_settings()
        path = s.project_root / s.promotion_policy
        if not path.exists():
            path = Path(__file__).resolve().parents[2] / "configs" / "promotion.yaml"
    return load_yaml_config(Path(path), PromotionPolicy)  # type: ignore[return-value]


def licence_failures(licences: dict[str, str] | None, forbid: list[str]) -> list[str]:
    """Production's licence rule: each source whose licence the policy forbids, named with it."""
    if not forbid:
        return []
    if licences is None:
        return [f"licences not recorded on the version: cannot check that it carries none of {forbid} "
                f"(rule: licences.forbid)"]
    return [f"source {src} is {lic!r}, which production may not carry (rule: licences.forbid)"
            for src, lic in forbidden(licences, forbid)]


def policy_failures(alias: str, metrics: dict[str, float], policy: PromotionPolicy, validation: str | None,
                    md5: str | None, holder: int | None = None, holder_metrics: dict[str, float] | None = None,
                    comparison: RunComparison | None = None, licences: dict[str, str] | None = None) -> list[str]:
    """Every reason `alias` should refuse a version with these evaluation metrics; [] = promote.
    `validation` is the data gate's outcome for `md5`; `holder_metrics` the current holder's;
    `comparison` the candidate against the holder item by item (None: compare point scores);
    `licences` the version's sources -> licence (None: not recorded)."""
    out: list[str] = licence_failures(licences, policy.licences.forbid) if alias == "production" else []
    st, prim = policy.staging, primary_of(metrics)
    if st.require_validation:
        if md5 == IMPORTED_DATA:
            pass  # trained outside SkyEye (skyeye import): no SkyEye data to gate; its file's sha256 is its record
        elif not md5 or md5 == UNVERSIONED:
            out.append("data unversioned: staging needs a DVC-versioned data set with a passed validation")
        elif validation is None:
            out.append(f"data {md5[:12]}: never validated (run `skyeye data validate`)")
        elif validation != "passed":
            out.append(f"data {md5[:12]}: validation {validation}")
    for key in EVAL_KEYS:
        if key not in prim:
            if st.require_all_benchmarks:
                out.append(f"{primary_metric(key)}: not evaluated")
            continue
        bar = st.floor_of(key)
        if prim[key] < bar:
            out.append(f"{primary_metric(key)} {prim[key]:.1f} < floor {bar:.1f} ({prim[key] - bar:+.1f})")
    if st.require_approved_task and not approved_tasks(metrics):
        out.append(_no_approved_task(metrics))
    if alias != "production" or holder is None:
        return out
    if holder_metrics is None:
        return out + [f"current production version {holder} has no readable evaluation run: cannot compare"]
    for key, theirs in primary_of(holder_metrics).items():
        if key not in prim:
            out.append(f"{primary_metric(key)}: not evaluated (production {theirs:.1f})")
    if comparison is None:
        return out + _point_failures(prim, metrics, holder_metrics, policy.production)
    return out + _interval_failures(comparison, holder, policy.production)


def _no_approved_task(metrics: dict[str, float]) -> str:
    """The refusal of a version approved for no task, naming each task's splits that fall short."""
    short = "; ".join(f"{task}: " + ", ".join(f"{key} {v}" for key, v in splits.items() if v != "better")
                      for task, splits in trivial_verdicts(metrics).items())
    return (f"approved for no task ({short}): a task is approved when its primary metric is significantly above "
            f"its trivial baseline ({', '.join(f'{t} {TRIVIAL[t]}' for t in TASKS)}) on every split "
            f"(rule: staging.require_approved_task)")


def _interval_failures(comparison: RunComparison, holder: int, pt: ProductionPolicy) -> list[str]:
    out, pct = [], f"{comparison.level:.0%}"
    for key, c in comparison.splits.items():
        tol, d = pt.tolerance_of(key), c.delta
        if d.high < -tol:
            out.append(f"{key}/{c.metric} {c.ours:.1f} vs production v{holder} {c.theirs:.1f}: {d.value:+.1f}, "
                       f"{pct} interval [{d.low:+.1f}, {d.high:+.1f}] lies wholly below -{tol:g} "
                       f"(rule: a {TASK_OF[key]} split regresses beyond its tolerance of {tol:g})")
    p = comparison.primary
    if p is None:
        return out + ["primary_score: no bench split in common with production: cannot compare"]
    shown = f"primary_score {p.value:+.2f} vs production v{holder}, {pct} interval [{p.low:+.2f}, {p.high:+.2f}]"
    if pt.primary == "better" and not p.low > pt.min_primary_gain:
        gain = f" by more than {pt.min_primary_gain:g}" if pt.min_primary_gain else ""
        out.append(f"{shown}: not significantly better{gain} (rule: production.primary = better)")
    elif pt.primary == "not_worse" and p.high < 0:
        out.append(f"{shown}: significantly worse (rule: production.primary = not_worse)")
    return out


def _point_failures(prim: dict[str, float], metrics: dict[str, float], holder_metrics: dict[str, float],
                    pt: ProductionPolicy) -> list[str]:
    """Bare tolerances on the point scores: for a holder evaluated before per-item statistics were kept."""
    out = []
    for key, theirs in primary_of(holder_metrics).items():
        ours, tol = prim.get(key), pt.tolerance_of(key)
        if ours is not None and ours < theirs - tol:
            out.append(f"{primary_metric(key)} {ours:.1f} < production {theirs:.1f} - {tol:.1f} tolerance "
                       f"({ours - theirs:+.1f})")
    ours, theirs = primary_score(metrics), primary_score(holder_metrics)
    if theirs is not None and (ours is None or ours <= theirs + pt.min_primary_gain):
        gain = f" + {pt.min_primary_gain:.2f} gain" if pt.min_primary_gain else ""
        out.append(f"primary_score {ours or 0:.2f} <= production {theirs:.2f}{gain} "
                   f"({(ours or 0) - theirs:+.2f}): production needs a strictly better primary score")
    return out


def deltas(metrics: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    """Per bench split primary-metric change against the previous holder (and primary_score), point scores."""
    if not before:
        return {}
    ours, theirs = primary_of(metrics), primary_of(before)
    out = {primary_metric(k): round(ours[k] - theirs[k], 4) for k in EVAL_KEYS if k in ours and k in theirs}
    a, b = primary_score(metrics), primary_score(before)
    if a is not None and b is not None:
        out[PRIMARY_SCORE] = round(a - b, 4)
    return out


def _interval_text(value: float | None, low: float | None, high: float | None) -> str | None:
    if value is None:
        return None
    return f"{value:.1f}" if low is None or high is None else f"{value:.1f} [{low:.1f}, {high:.1f}]"


def scoreboard(version: int, against: int | None, policy: PromotionPolicy | None = None) -> list[dict]:
    """Per bench split: the primary metric of `version` with its interval, its paired difference
    to the split's trivial baseline and to `against` (the production it would replace), each
    with its interval and verdict: the table a retrain run and `skyeye models VERSION` show."""
    client, name = runs.client(), model_name()
    pt = (policy or load_policy()).production
    ours, mv = eval_metrics(client, name, version)
    comparison = None
    if against is not None:
        theirs_mv = client.get_model_version(name, str(against))
        comparison = _compare_with_holder(mv, theirs_mv, pt)
    rows = []
    for key, value in primary_of(ours).items():
        m = primary_metric(key)
        trivial = TRIVIAL[TASK_OF[key]]
        d = delta_metric(key, PRIMARY[TASK_OF[key]], trivial)
        row = {"benchmark": key, "metric": m.split("/", 1)[1],
               "candidate": _interval_text(value, *(ours.get(b) for b in ci_bounds(m))),
               "trivial baseline": _interval_text(ours.get(f"baseline.{trivial}/{m}"), None, None),
               "vs trivial": _interval_text(ours.get(d), *(ours.get(b) for b in ci_bounds(d)))}
        if d in ours and ci_bounds(d)[0] in ours:
            row["vs trivial"] += " " + verdict(*(ours[b] for b in ci_bounds(d)))
        if comparison is not None and key in comparison.splits:
            c = comparison.splits[key]
            row |= {"production": f"{c.theirs:.1f}",
                    "vs production": f"{c.delta.value:+.1f} [{c.delta.low:+.1f}, {c.delta.high:+.1f}] "
                                     f"{c.delta.verdict}"}
        rows.append(row)
    return rows


# ------------------------------------------------------------------ promotion
@dataclass
class PromotionResult:
    version: int
    alias: str
    previous: int | None
    forced: bool = False
    reason: str = ""
    comparison: dict = field(default_factory=dict)  # per split: delta, low, high, verdict (or a point delta)
    overridden: list[str] = field(default_factory=list)
    at: str = ""
    by: str = ""
    unchanged: bool = False

    def render(self) -> str:
        name = model_name()
        if self.unchanged:
            return f"version {self.version} already holds {self.alias}; nothing changed"
        lines = [f"{name}@{self.alias} -> version {self.version} (was {self.previous or 'none'})"
                 + (" FORCED" if self.forced else ""), f"  by {self.by} at {self.at}"]
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        lines += [f"  overridden: {f}" for f in self.overridden]
        for key, d in self.comparison.items():
            lines.append(f"  {key:32s} {d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {d['verdict']}"
                         if isinstance(d, dict) else f"  {key:32s} {d:+.2f} (point scores)")
        return "\n".join(lines)


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")


def _compare_with_holder(mv, holder_mv, pt: ProductionPolicy) -> RunComparison | None:
    ours, theirs = mv.tags.get(TAG_EVAL_RUN), holder_mv.tags.get(TAG_EVAL_RUN)
    if not ours or not theirs:
        return None
    # scored on another data version: the same item ids need not be the same items
    same = mv.tags.get(TAG_DVC_MD5) == holder_mv.tags.get(TAG_DVC_MD5)
    return compare_runs(ours, theirs, pt.resamples, level=pt.level, same_items=same)


def promote(version: int | str, to: str, force: bool = False, reason: str | None = None,
            policy: PromotionPolicy | None = None) -> PromotionResult:
    """Point alias `to` at `version` if the policy allows (or `force` with a reason); the
    record is written on the version before the alias moves, under a lock, against the
    holder read inside the lock. Raises PromotionRefused naming each failed check, after
    recording the refusal on the version."""
    _check_alias(to)
    reason = (reason or "").strip()
    if force and not reason:
        raise ValueError("--force needs --reason TEXT: every override is recorded with why")
    client, name = runs.client(), model_name()
    v = resolve_version(version)
    policy = policy or load_policy()
    metrics, mv = eval_metrics(client, name, v)  # a version whose evaluation failed never moves, even forced
    md5 = mv.tags.get(TAG_DVC_MD5)
    with lock(name):
        holder = aliases(client, name).get(to)
        if holder == v:
            return PromotionResult(v, to, holder, unchanged=True)
        before, comparison = None, None
        if holder is not None:
            try:
                before, holder_mv = eval_metrics(client, name, holder)
                if to == "production":
                    comparison = _compare_with_holder(mv, holder_mv, policy.production)
            except (RegistryError, MlflowException):
                before = None
        validation = validation_outcome(md5) if md5 and md5 not in (UNVERSIONED, IMPORTED_DATA) else None
        failures = policy_failures(to, metrics, policy, validation, md5, holder, before, comparison,
                                   read_licences(mv.tags))
        if to == "production" and holder is not None and policy.canary.require:
            failures += canary_failures(v, holder, policy.canary)
        compared = comparison.record() if comparison is not None else deltas(metrics, before)
        how = "intervals" if comparison is not None else "point scores"
        if failures and not force:
            refusal = {"at": now(), "by": user(), "against": str(holder or "none"), "policy": how,
                       "comparison": compared, "failures": failures}
            client.set_model_version_tag(name, str(v), record_tag(REFUSAL, to), json.dumps(refusal))
            raise PromotionRefused(v, to, failures)
        result = PromotionResult(v, to, holder, bool(failures), reason, compared, failures, now(), user())
        record = {"at": result.at, "by": result.by, "previous": str(holder or "none"), "forced": result.forced,
                  "reason": reason, "policy": how, "comparison": compared, "overridden": failures}
        # the record first: the alias never points at an unrecorded version
        client.set_model_version_tag(name, str(v), record_tag(PROMOTION, to), json.dumps(record))
        if TAG_APPROVED_TASKS not in mv.tags:  # registered before approvals were recorded: what serving reads
            client.set_model_version_tag(name, str(v), TAG_APPROVED_TASKS, json.dumps(approved_tasks(metrics)))
        client.set_registered_model_alias(name, to, str(v))
    return result


def rollback(alias: str = "production", reason: str | None = None) -> tuple[int, int]:
    """Put the version that held `alias` before the current one back; returns (from, to).
    Repeated rollbacks walk further back through the promotion records."""
    _check_alias(alias)
    client, name = runs.client(), model_name()
    with lock(name):
        current = aliases(client, name).get(alias)
        if current is None:
            raise RegistryError(f"alias {alias!r} of {name} is not set: nothing to roll back")
        tags = client.get_model_version(name, str(current)).tags
        prev = str(read_records(tags, PROMOTION).get(alias, {}).get("previous") or "none")
        if prev == "none":
            raise RegistryError(f"{name}@{alias} is version {current}, which has no previous {alias} version "
                                f"(its {record_tag(PROMOTION, alias)} record names none): nothing to roll back to")
        target = version_exists(client, name, int(prev))
        record = {"at": now(), "from": str(current), "by": user(), "reason": (reason or "").strip()}
        client.set_model_version_tag(name, str(target), record_tag(ROLLBACK, alias), json.dumps(record))
        client.set_registered_model_alias(name, alias, str(target))
    return current, target
