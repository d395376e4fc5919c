"""The policy that moves the aliases `staging` / `production` of SkyEyeGPT in the MLflow
model registry (configs/promotion.yaml), and the moves themselves: `promote` (checked
against the policy, or forced with a recorded reason) and `rollback`.

Apart from `store` because the policy and its records are a component of their own; this
module reads versions, aliases and evaluation runs through `store` and `references`
(which never import it). Every promotion and rollback is recorded as tags on the version
it concerns, written before the alias moves, under the registry's lock (`store.lock`: on a
tracking server one that every machine sees): of two promotions at once, the second waits,
then judges its candidate against the version the first put there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, field_validator

from ..config import get_settings, load_yaml_config
from ..datagate.gate import validation_outcome
from ..formats.benchmarks import EVAL_KEYS, PRIMARY, PRIMARY_SCORE, TASK_OF, primary_metric, primary_of
from ..tracking import runs
from ..tracking.names import TAG_DVC_MD5, UNVERSIONED, promotion_tag, rollback_tag
from .references import RegistryError, aliases, model_name, resolve_version, version_exists
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
    tolerance: float = 2.0
    tolerances: dict[str, float] = {}
    min_primary_gain: float = 0.0

    @field_validator("tolerances")
    @classmethod
    def _tasks(cls, v: dict) -> dict:
        return _known_tasks(v)

    def tolerance_of(self, key: str) -> float:
        return self.tolerances.get(TASK_OF[key], self.tolerance)


class PromotionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    staging: StagingPolicy = StagingPolicy()
    production: ProductionPolicy = ProductionPolicy()


def load_policy(path: str | Path | None = None) -> PromotionPolicy:
    """The project's policy file (Settings.promotion_policy), else the one shipped beside this package."""
    if path is None:
        s = get_settings()
        path = s.project_root / s.promotion_policy
        if not path.exists():
            path = Path(__file__).resolve().parents[2] / "configs" / "promotion.yaml"
    return load_yaml_config(Path(path), PromotionPolicy)  # type: ignore[return-value]


def policy_failures(alias: str, metrics: dict[str, float], policy: PromotionPolicy, validation: str | None,
                    md5: str | None, holder: int | None = None, holder_metrics: dict[str, float] | None = None
                    ) -> list[str]:
    """Every reason `alias` should refuse a version with these evaluation metrics; [] = promote.
    `validation` is the data gate's outcome for `md5`; `holder_metrics` the current holder's."""
    out: list[str] = []
    st, prim = policy.staging, primary_of(metrics)
    if st.require_validation:
        if not md5 or md5 == UNVERSIONED:
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
    if alias != "production" or holder is None:
        return out
    if holder_metrics is None:
        return out + [f"current production version {holder} has no readable evaluation run: cannot compare"]
    pt = policy.production
    for key, theirs in primary_of(holder_metrics).items():
        ours, tol = prim.get(key), pt.tolerance_of(key)
        if ours is None:
            out.append(f"{primary_metric(key)}: not evaluated (production {theirs:.1f})")
        elif ours < theirs - tol:
            out.append(f"{primary_metric(key)} {ours:.1f} < production {theirs:.1f} - {tol:.1f} tolerance "
                       f"({ours - theirs:+.1f})")
    ours, theirs = primary_score(metrics), primary_score(holder_metrics)
    if theirs is not None and (ours is None or ours <= theirs + pt.min_primary_gain):
        gain = f" + {pt.min_primary_gain:.2f} gain" if pt.min_primary_gain else ""
        out.append(f"primary_score {ours or 0:.2f} <= production {theirs:.2f}{gain} "
                   f"({(ours or 0) - theirs:+.2f}): production needs a strictly better primary score")
    return out


def deltas(metrics: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    """Per bench split primary-metric change against the previous holder (and primary_score)."""
    if not before:
        return {}
    ours, theirs = primary_of(metrics), primary_of(before)
    out = {primary_metric(k): round(ours[k] - theirs[k], 4) for k in EVAL_KEYS if k in ours and k in theirs}
    a, b = primary_score(metrics), primary_score(before)
    if a is not None and b is not None:
        out[PRIMARY_SCORE] = round(a - b, 4)
    return out


def scoreboard(version: int, against: int | None) -> list[dict]:
    """Per bench split: the primary metric of `version`, of `against` (the production it
    would replace) and of the split's trivial baseline, with the deltas: the table a
    retrain run shows next to its promotion decision."""
    from ..evaluation.baselines import TRIVIAL
    client, name = runs.client(), model_name()
    ours = eval_metrics(client, name, version)[0]
    theirs = eval_metrics(client, name, against)[0] if against is not None else {}
    rows = []
    for key, value in primary_of(ours).items():
        trivial = ours.get(f"baseline.{TRIVIAL[TASK_OF[key]]}/{primary_metric(key)}")
        held = primary_of(theirs).get(key)
        rows.append({"benchmark": key, "metric": primary_metric(key).split("/", 1)[1], "candidate": round(value, 2),
                     "production": None if held is None else round(held, 2),
                     "vs production": None if held is None else round(value - held, 2),
                     "trivial baseline": None if trivial is None else round(trivial, 2),
                     "vs trivial": None if trivial is None else round(value - trivial, 2)})
    return rows


# ------------------------------------------------------------------ promotion
@dataclass
class PromotionResult:
    version: int
    alias: str
    previous: int | None
    forced: bool = False
    reason: str = ""
    deltas: dict[str, float] = field(default_factory=dict)
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
        lines += [f"  {k:32s} {v:+.2f}" for k, v in self.deltas.items()]
        return "\n".join(lines)


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")


def promote(version: int | str, to: str, force: bool = False, reason: str | None = None,
            policy: PromotionPolicy | None = None) -> PromotionResult:
    """Point alias `to` at `version` if the policy allows (or `force` with a reason); the
    record is written on the version before the alias moves, under a lock, against the
    holder read inside the lock. Raises PromotionRefused naming each failed check."""
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
        before = None
        if holder is not None:
            try:
                before = eval_metrics(client, name, holder)[0]
            except (RegistryError, MlflowException):
                before = None
        validation = validation_outcome(md5) if md5 and md5 != UNVERSIONED else None
        failures = policy_failures(to, metrics, policy, validation, md5, holder, before)
        if failures and not force:
            raise PromotionRefused(v, to, failures)
        result = PromotionResult(v, to, holder, bool(failures), reason, deltas(metrics, before),
                                 failures, now(), user())
        record = {"at": result.at, "from": str(holder or "none"), "by": result.by, "reason": reason,
                  "forced": str(result.forced).lower(), "deltas": json.dumps(result.deltas),
                  "previous": str(holder or "none"), "overridden": json.dumps(failures)}
        for key, value in record.items():  # the record first: the alias never points at a half-recorded version
            client.set_model_version_tag(name, str(v), promotion_tag(to, key), value)
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
        prev = client.get_model_version(name, str(current)).tags.get(promotion_tag(alias, "previous"), "none")
        if prev == "none":
            raise RegistryError(f"{name}@{alias} is version {current}, which has no previous {alias} version "
                                f"({promotion_tag(alias, 'previous')} is unset or 'none'): nothing to roll back to")
        target = version_exists(client, name, int(prev))
        for key, value in {"at": now(), "from": str(current), "by": user(), "reason": (reason or "").strip()}.items():
            client.set_model_version_tag(name, str(target), rollback_tag(alias, key), value)
        client.set_registered_model_alias(name, alias, str(target))
    return current, target
