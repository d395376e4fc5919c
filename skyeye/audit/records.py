"""What an audit reports: the records `chain` fills in while it follows the links
(runs, data.dvc revisions, validations, model versions), the two results `ModelAudit`
and `DataAudit` with their text (`.render()`) and JSON-ready (`.to_dict()`) forms, and
the "missing: <why>" convention for a link that cannot be followed.

Apart from `chain` so that how a result reads stays separate from how it is gathered;
it reads nothing itself (no MLflow, git or DVC calls) and imports neither `chain` nor
`reader`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..datagate.versioning import DVC_FILE
from ..formats.licences import lines as licence_lines

MD5_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


def missing(why: str) -> str:
    return f"missing: {why}"


def is_missing(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("missing: ")


def md5_key(md5: str) -> str:
    """data.dvc writes directory hashes as '<md5>.dir'; people often drop the suffix."""
    return md5.removesuffix(".dir")


def usable_md5(md5: str | None) -> bool:
    return bool(md5) and MD5_RE.match(md5) is not None


# ---------------------------------------------------------------- pieces of the chain

@dataclass
class RunSummary:
    run_id: str
    name: str | None = None
    experiment: str | None = None
    kind: str | None = None
    stage: str | None = None
    status: str | None = None
    started: str | None = None
    deleted: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    data_md5: str | None = None  # its skyeye.data.dvc_md5 tag
    data_git_rev: str | None = None
    dataset_digests: list[str] = field(default_factory=list)  # digest = DVC md5 of each logged dataset input
    git_commit: str | None = None
    model_dir: str | None = None
    test_splits_read: str | None = None  # `none` on a tuning stage; the bench splits on an evaluation

    @property
    def label(self) -> str:
        if self.kind == "tuning-stage" and self.stage:
            return f"stage{self.stage}"
        return self.kind or self.name or "run"

    def line(self, label: str | None = None, note: str = "") -> str:
        bits = [f"{label or self.label:<11} {self.run_id}", self.status or "?", (self.started or "")[:19]]
        if self.name and self.name != self.label:
            bits.append(f'"{self.name}"')
        if self.deleted:
            bits.append("DELETED")
        bits.append(note)
        if self.test_splits_read:
            bits.append(f"test splits read: {self.test_splits_read}")
        if self.metrics:
            bits.append(", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()))
        return "  ".join(b for b in bits if b)


@dataclass
class GitRevision:
    rev: str
    date: str
    message: str


@dataclass
class Validation:
    run_id: str
    outcome: str
    at: str | None
    git_rev: str | None
    licences: dict[str, str] | None = None  # its data card's sources -> licence, as the gate's run records them


def _tree(lines: list[str], items: list[str], indent: str) -> None:
    lines += [indent + item for item in items]


# ---------------------------------------------------------------- model version -> data

@dataclass
class ModelAudit:
    model: str
    version: str
    aliases: list[str]
    created: str | None
    source: str | None
    source_run: str | None
    training_run: str  # the stage-2 run id, or "missing: ..."
    tuning_job: RunSummary | str
    training_runs: list[RunSummary]
    data_md5: str
    data_sources: dict[str, str]  # where each recorded md5 came from -> the md5 it records
    data_git_rev_tag: str | None
    data_revisions: list[GitRevision] | str
    validation: Validation | str
    validations: int
    evaluation: RunSummary | str
    promotions: list[dict[str, Any]]
    rollbacks: list[dict[str, Any]]
    approved_tasks: list[str] | None = None  # None: the version has no approval tag
    missing: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    imported: dict[str, Any] | None = None  # the checkpoint file an imported version came from
    serving: list[dict[str, Any]] = field(default_factory=list)  # periods: endpoint, since, until
    licences: dict[str, str] | None = None  # the version's data: source -> licence (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        aliases = f"  [{', '.join(self.aliases)}]" if self.aliases else "  (no alias)"
        approved = ("not recorded (no approval tag: served as approved for no task)" if self.approved_tasks is None
                    else ", ".join(self.approved_tasks) or "no task")
        lines = [f"model {self.model} version {self.version}{aliases}",
                 f"  created {self.created or '?'} from {self.source or '?'} (run {self.source_run or '-'})",
                 *([f"  imported: {self.imported.get('file')} ({self.imported.get('bytes')} bytes, sha256 "
                    f"{self.imported.get('sha256')}), {self.imported.get('format')} checkpoint trained outside "
                    "SkyEye: no SkyEye data version"] if self.imported else []),
                 f"  approved for: {approved} (significantly above the trivial baseline on every split of the task)"]
        lines.append("  promotions")
        if not self.promotions and not self.rollbacks:
            lines.append("    none recorded")
        for p in self.promotions:
            if "missing" in p:
                lines.append(f"    {p['to']}: {p['missing']}")
                continue
            forced = "  FORCED" if str(p.get("forced")).lower() in ("true", "1", "yes") else ""
            lines.append(f"    -> {p['to']}  at {p.get('at')}  by {p.get('by')}  "
                         f"(previous: {p.get('previous') or p.get('from') or 'none'}){forced}")
            if p.get("reason"):
                lines.append(f"       reason: {p['reason']}")
            compared = p.get("comparison") or p.get("deltas")  # `deltas`: records written before intervals
            if isinstance(compared, dict) and compared:
                lines.append(f"       against the previous holder ({p.get('policy') or 'point scores'}):")
                lines += [f"         {k:32s} {_compared(v)}" for k, v in compared.items()]
            elif compared:
                lines.append(f"       deltas: {compared}")
        for r in self.rollbacks:
            lines.append(f"    rollback of {r['alias']} to this version  at {r.get('at')}  by {r.get('by')}  "
                         f"(from {r.get('from')})")
        lines.append("  serving")
        if not self.serving:
            lines.append("    never served")
        for p in self.serving:
            lines.append(f"    {p.get('endpoint') or '?'}  since {p.get('since')}  until "
                         f"{p.get('until') or 'now (still served, or its server ended without a record)'}")
        lines.append("  evaluation")
        lines.append("    " + (self.evaluation if isinstance(self.evaluation, str) else self.evaluation.line()))
        lines.append("  training")
        lines.append(f"    training run (stage 2): {self.training_run}")
        job = self.tuning_job
        lines.append("    " + (f"tuning job: {job}" if isinstance(job, str) else job.line("tuning job")))
        _tree(lines, [r.line(note="<- registered" if r.run_id == self.training_run else "")
                      for r in self.training_runs], "      ")
        lines.append("  data")
        lines.append(f"    DVC md5 {self.data_md5}")
        agree = sorted({s for s, m in self.data_sources.items() if usable_md5(self.data_md5) and m == self.data_md5})
        if agree:
            lines.append(f"      recorded by {len(agree)} source(s): {', '.join(agree)}")
        if isinstance(self.data_revisions, str):
            lines.append(f"    {DVC_FILE} revision: {self.data_revisions}")
        for rev in self.data_revisions if isinstance(self.data_revisions, list) else []:
            lines.append(f"    {DVC_FILE} at git {rev.rev}  {rev.date[:19]}  \"{rev.message}\"")
        lines += _licence_lines(self.licences, "    ")
        v = self.validation
        lines.append("    validation " + (v if isinstance(v, str) else
                                           f"{v.outcome.upper()}  run {v.run_id}  at {v.at}"
                                           + (f"  ({self.validations} validations, newest shown)"
                                              if self.validations > 1 else "")))
        lines += _footer(self.missing, self.disagreements)
        return "\n".join(lines)


def _licence_lines(licences: dict[str, str] | None, indent: str) -> list[str]:
    if not licences:
        return [f"{indent}licences: not recorded (data built, or the version registered, before they were)"]
    return [f"{indent}licences (source: terms)", *(f"{indent}  {line}" for line in licence_lines(licences))]


def _footer(missing_links: list[str], disagreements: list[str]) -> list[str]:
    lines = [f"missing links: {len(missing_links) or 'none'}"]
    _tree(lines, missing_links, "  - ")
    if disagreements:
        lines.append(f"DISAGREEMENTS: {len(disagreements)}")
        _tree(lines, disagreements, "  - ")
    return lines


# ---------------------------------------------------------------- data version -> models

@dataclass
class ModelVersionRef:
    version: str
    aliases: list[str]
    training_run: str | None
    eval_run: str | None
    matched_by: str  # the version's md5 tag, or its training run being one trained on this data


@dataclass
class DataAudit:
    md5: str
    asked: str
    revisions: list[GitRevision] | str
    validations: list[Validation] | str
    tuning_runs: list[RunSummary]
    evaluation_runs: list[RunSummary]
    model: str
    versions: list[ModelVersionRef]
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"data {self.md5}" + (f"  (asked for {self.asked})" if self.asked != self.md5 else "")]
        if isinstance(self.revisions, str):
            lines.append(f"  {DVC_FILE} revision: {self.revisions}")
        for rev in self.revisions if isinstance(self.revisions, list) else []:
            lines.append(f"  {DVC_FILE} at git {rev.rev}  {rev.date[:19]}  \"{rev.message}\"")
        recorded = [v.licences for v in self.validations if v.licences] if isinstance(self.validations, list) else []
        lines += _licence_lines(recorded[0] if recorded else None, "  ")
        lines.append("  validations")
        if isinstance(self.validations, str):
            lines.append(f"    {self.validations}")
        for v in self.validations if isinstance(self.validations, list) else []:
            lines.append(f"    {v.outcome.upper():<7} run {v.run_id}  at {v.at}")
        lines.append(f"  tuning runs trained on it: {len(self.tuning_runs) or 'none'}")
        _tree(lines, [r.line() for r in self.tuning_runs], "    ")
        lines.append(f"  evaluation runs on it: {len(self.evaluation_runs) or 'none'}")
        _tree(lines, [r.line() for r in self.evaluation_runs], "    ")
        lines.append(f"  registered versions of {self.model}")
        if not self.versions:
            lines.append("    none")
        for v in self.versions:
            aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
            lines.append(f"    version {v.version}{aliases}  training run {v.training_run or '-'}  "
                         f"evaluation run {v.eval_run or '-'}  ({v.matched_by})")
        lines += _footer(self.missing, [])
        return "\n".join(lines)


def _compared(v: Any) -> str:
    """One split of a promotion record: a difference with its interval and verdict, or a bare delta."""
    if isinstance(v, dict):
        return f"{v['delta']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}] {v['verdict']}"
    return f"{v:+.4g}" if isinstance(v, (int, float)) else str(v)
