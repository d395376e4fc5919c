"""The canary report: production and a candidate served beside it (skyeye/serving/router.py)
compared on the traffic the inference log recorded (`log_schema.read_log`).

What it compares, per version (the candidate's rows are its `candidate` or `shadow` ones):
- error rate: the share of its requests that the server failed, a 5xx or a 429 (refused for
  load); other 4xx are the client's mistakes and count as requests only;
- latency p50 and p90 of its answered requests (status 200), in ms;
- per task, answer agreement on matching requests: in shadow mode both versions answered the
  very same request (same request_id); in canary mode no request is answered twice, so
  requests with the same input (task, prompt as logged, image perceptual hash) answered by
  both versions are paired, one pair per input (each version's most frequent answer to it).
  Agreement is the share of pairs whose answers are the same text. Without pairs it is unknown.

The verdict is clean when the candidate answered at least `min_requests`, its error rate is
at most `max_error_rate_increase` above production's, and its p90 latency at most
`max_latency_increase` (a fraction) above production's. The tolerances are the promotion
policy's (configs/promotion.yaml `canary:`), which can require a clean canary for production.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

CANDIDATE_ROLES = ("candidate", "shadow")


class CanaryTolerance(BaseModel):
    """How far a candidate may fall behind production on live traffic and still be clean."""
    model_config = ConfigDict(extra="forbid")
    min_requests: int = Field(200, ge=1, description="Requests the candidate must have answered (or failed).")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="Error rate above production's, as a "
                                                                         "fraction of requests.")
    max_latency_increase: float = Field(0.25, ge=0, description="p90 latency above production's, as a fraction "
                                                                "of production's.")
    window_days: float = Field(7, gt=0, description="The log's rows this far back are the canary's.")


@dataclass
class VersionFigures:
    version: int | None
    role: str
    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p90_ms: float | None


@dataclass
class TaskAgreement:
    task: str
    pairs: int
    agreement: float | None  # None: no pair to compare


@dataclass
class CanaryReport:
    mode: str  # shadow (paired by request) or canary (paired by input)
    production: VersionFigures
    candidate: VersionFigures
    tasks: list[TaskAgreement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self) | {"clean": self.clean}

    def render(self) -> str:
        def row(f: VersionFigures) -> str:
            ms = (f"p50 {f.p50_ms:.0f} ms, p90 {f.p90_ms:.0f} ms" if f.p90_ms is not None else "no answer")
            rate = "-" if f.error_rate is None else f"{f.error_rate:.2%}"
            return f"  {f.role:10s} version {f.version}: {f.requests} requests, errors {f.errors} ({rate}), {ms}"
        how = "same request" if self.mode == "shadow" else "same input"
        lines = [f"canary report ({self.mode}): candidate version {self.candidate.version} vs production "
                 f"version {self.production.version}", row(self.production), row(self.candidate),
                 f"  answer agreement per task (pairs: {how}):"]
        lines += [f"    {t.task:10s} {t.pairs:5d} pairs, "
                  + ("unknown" if t.agreement is None else f"{t.agreement:.1%} agree") for t in self.tasks] \
            or ["    no task"]
        lines.append("verdict: clean" if self.clean else "verdict: NOT clean\n" +
                     "\n".join(f"  - {f}" for f in self.failures))
        return "\n".join(lines)


def _figures(rows: pd.DataFrame, version: int | None, role: str) -> VersionFigures:
    n = len(rows)
    errors = int(((rows["status"] >= 500) | (rows["status"] == 429)).sum())
    answered = rows.loc[rows["status"] == 200, "latency_ms"].dropna()
    p50, p90 = (None, None) if answered.empty else (float(answered.quantile(0.5)), float(answered.quantile(0.9)))
    return VersionFigures(version, role, n, errors, errors / n if n else None, p50, p90)


def _agreement(prod: pd.DataFrame, cand: pd.DataFrame, mode: str) -> list[TaskAgreement]:
    prod, cand = prod[prod["status"] == 200], cand[cand["status"] == 200]
    if mode == "shadow":
        pairs = prod.merge(cand, on="request_id", suffixes=("_p", "_c"))
        pairs["task"] = pairs["task_p"]
    else:
        key = ["task", "prompt", "image_phash"]

        def usual(rows: pd.DataFrame) -> pd.DataFrame:  # each input's most frequent answer
            return (rows.dropna(subset=["prompt"]).groupby(key, dropna=False)["answer"]
                    .agg(lambda a: a.value_counts().index[0]).reset_index())
        pairs = usual(prod).merge(usual(cand), on=key, suffixes=("_p", "_c"))
    tasks = sorted(set(prod["task"].dropna()) | set(cand["task"].dropna()))
    out = []
    for task in tasks:
        same = pairs[pairs["task"] == task]
        agree = float((same["answer_p"] == same["answer_c"]).mean()) if len(same) else None
        out.append(TaskAgreement(task, len(same), agree))
    return out


def canary_report(log: pd.DataFrame, tolerance: CanaryTolerance, candidate: int | None = None,
                  production: int | None = None) -> CanaryReport:
    """The report over the log's rows (`read_log`); the candidate defaults to the version that
    answered as candidate or shadow most recently, production to the one that answered the
    most as production. ValueError when the log holds no candidate's rows to compare."""
    cand_rows = log[log["role"].isin(CANDIDATE_ROLES)]
    if candidate is None:
        if cand_rows.empty:
            raise ValueError("the inference log holds no request answered by a candidate (role candidate or "
                             "shadow) in this window: serve one with `skyeye serve --canary PERCENT` or --shadow")
        candidate = int(cand_rows.sort_values("time")["version"].iloc[-1])
    cand_rows = cand_rows[cand_rows["version"] == candidate]
    prod_rows = log[log["role"] == "production"]
    if production is None and not prod_rows.empty:
        production = int(prod_rows["version"].value_counts().index[0])
    prod_rows = prod_rows[prod_rows["version"] == production]
    mode = "shadow" if (cand_rows["role"] == "shadow").sum() * 2 > len(cand_rows) else "canary"
    ours, theirs = _figures(cand_rows, candidate, mode if mode == "shadow" else "candidate"), \
        _figures(prod_rows, production, "production")
    report = CanaryReport(mode, theirs, ours, _agreement(prod_rows, cand_rows, mode))
    report.failures = _failures(ours, theirs, tolerance)
    return report


def _failures(ours: VersionFigures, theirs: VersionFigures, t: CanaryTolerance) -> list[str]:
    out = []
    if ours.requests < t.min_requests:
        out.append(f"candidate version {ours.version} answered {ours.requests} logged requests, fewer than the "
                   f"{t.min_requests} a canary needs (canary.min_requests)")
    if theirs.requests == 0:
        return out + [f"no production request in the log to compare with (version {theirs.version})"]
    if ours.error_rate is not None and ours.error_rate > theirs.error_rate + t.max_error_rate_increase:
        out.append(f"error rate {ours.error_rate:.2%} vs production {theirs.error_rate:.2%}: more than "
                   f"{t.max_error_rate_increase:.2%} above (canary.max_error_rate_increase)")
    if ours.p90_ms is not None and theirs.p90_ms is not None and \
            ours.p90_ms > theirs.p90_ms * (1 + t.max_latency_increase):
        out.append(f"p90 latency {ours.p90_ms:.0f} ms vs production {theirs.p90_ms:.0f} ms: more than "
                   f"{t.max_latency_increase:.0%} above (canary.max_latency_increase)")
    return out
