"""The audit: follow what MLflow, git and DVC recorded, from a registered SkyEyeGPT
version down to the data.dvc revision and its validation, and from a data version up
to every model trained on it.

It reads only those records (no side ledger that could drift). A link it cannot follow
(a missing tag, a deleted run, an md5 no commit of data.dvc holds, data never
validated) is reported as "missing: <why>" in place and listed in `.missing`; records
that contradict each other (a run's dataset digest against its tag, say) are listed in
`.disagreements`. Only an unknown version, alias or data revision raises (ValueError).

This module follows the links (`audit_model`, `audit_data`); the lookups themselves are
in `reader`, the records and results with their text and JSON forms in `records`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException

from ..config import Settings
from ..datagate.versioning import DVC_FILE, VersioningError, dvc_file_at, git, parse_dvc_file
from ..formats.benchmarks import PRIMARY_SCORE, primary_of
from ..model.references import model_name, parse_model_uri
from ..tracking.names import (
    EVALUATION_EXPERIMENT,
    KIND_TUNING_JOB,
    KIND_TUNING_STAGE,
    PROMOTION,
    ROLLBACK,
    TAG_DVC_MD5,
    TAG_EVAL_RUN,
    TAG_EVAL_TRAINING_RUN,
    TAG_GIT_REV,
    TAG_IMPORTED,
    TAG_INIT_RUN,
    TAG_PARENT,
    TAG_TRAINING_RUN,
    TAG_TUNING_JOB,
    TUNING_EXPERIMENT,
    VALIDATION_EXPERIMENT,
    read_approved,
    read_licences,
    read_records,
    serving_periods,
)
from .reader import Reader, md5_variants, when
from .records import (
    MD5_RE,
    DataAudit,
    GitRevision,
    ModelAudit,
    ModelVersionRef,
    RunSummary,
    Validation,
    md5_key,
    missing,
    usable_md5,
)

# ---------------------------------------------------------------- model version -> data

def _version(reader: Reader, ref: str | int) -> Any:
    name, version, alias = parse_model_uri(ref, model_name())
    try:
        return reader.client.get_model_version(name, version) if version else \
            reader.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        pass
    try:
        reader.client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model {name!r} in {reader.settings.tracking_uri} "
                         f"(asked for {ref!r})") from None
    what = f"version {version}" if version else f"alias {alias!r}"
    raise ValueError(f"registered model {name!r} has no {what} (asked for {ref!r})") from None


@dataclass
class _Findings:
    """The links that could not be followed and the records that disagree, as they are found."""
    gaps: list[str] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)

    def gap(self, section: str, text: str) -> str:
        self.gaps.append(f"{section}: {text}")
        return text


@dataclass
class _Training:
    run_id: str  # the stage-2 run's id, or "missing: ..."
    stage2: Any  # the stage-2 run, or None
    job: RunSummary | str
    runs: list[RunSummary]


def _training(reader: Reader, tags: dict[str, str], found: _Findings) -> _Training:
    """The stage-2 run on the version, its tuning job and the job's backbones / stage runs."""
    stage2_id = tags.get(TAG_TRAINING_RUN)
    stage2, why = reader.run(stage2_id, f"training run (tag {TAG_TRAINING_RUN})")
    run_id = stage2_id if why is None else found.gap("training", why)
    job_id = tags.get(TAG_TUNING_JOB)
    parent_of_stage2 = stage2.data.tags.get(TAG_PARENT) if stage2 else None
    if job_id and parent_of_stage2 and job_id != parent_of_stage2:
        found.clashes.append(f"tag {TAG_TUNING_JOB} says tuning job {job_id}, but training run {stage2_id} "
                             f"belongs to {parent_of_stage2}")
    if not job_id and parent_of_stage2:
        found.gap("training", missing(f"tag {TAG_TUNING_JOB} not on the version; the tuning job was found as "
                                      f"the training run's parent"))
        job_id = parent_of_stage2
    job, why = reader.run(job_id, f"tuning job (tag {TAG_TUNING_JOB})")
    summary: RunSummary | str = reader.summary(job, ()) if job else found.gap("training", why)
    if job and why:
        found.gap("training", why)
    if not job:
        return _Training(run_id, stage2, summary, [reader.summary(stage2)] if stage2 else [])
    runs = [reader.summary(r) for r in reader.children(job.info.run_id, job.info.experiment_id)]
    for r in runs:
        if r.deleted and r.run_id != stage2_id:
            found.gap("training", missing(f"{r.label} run {r.run_id} of the tuning job was deleted"))
    stages = {r.stage for r in runs if r.kind == KIND_TUNING_STAGE}
    init_id = stage2.data.tags.get(TAG_INIT_RUN) if stage2 else None
    if "1" not in stages and init_id:  # stage 1 ran as its own job: follow the stage-2 run's start point
        init_run, why = reader.run(init_id, f"stage-1 run (tag {TAG_INIT_RUN} of the stage-2 run)")
        if init_run:
            runs.append(reader.summary(init_run))
            stages.add("1")
        else:
            found.gap("training", why)
    for n in ("1", "2"):
        if n not in stages:
            found.gap("training", missing(f"no stage-{n} run under tuning job {job.info.run_id}"))
    if stage2_id and stage2 and stage2_id not in {r.run_id for r in runs}:
        runs.append(reader.summary(stage2))
    return _Training(run_id, stage2, summary, runs)


def _evaluation(reader: Reader, tags: dict[str, str], stage2_id: str | None, found: _Findings) -> RunSummary | str:
    """The evaluation run the version names, with its primary scores."""
    eval_run, why = reader.run(tags.get(TAG_EVAL_RUN), f"evaluation run (tag {TAG_EVAL_RUN})")
    if not eval_run:
        return found.gap("evaluation", why)
    evaluation = reader.summary(eval_run, None)
    metrics = eval_run.data.metrics
    evaluation.metrics = {k: v for k, v in [(PRIMARY_SCORE, metrics.get(PRIMARY_SCORE)), *primary_of(metrics).items()]
                          if v is not None}
    if eval_run.info.status != "FINISHED" or PRIMARY_SCORE not in metrics:
        found.gap("evaluation", missing(f"evaluation run {eval_run.info.run_id} is incomplete (status "
                                        f"{eval_run.info.status}, {PRIMARY_SCORE} {metrics.get(PRIMARY_SCORE)})"))
    evaluated = eval_run.data.tags.get(TAG_EVAL_TRAINING_RUN)
    if evaluated and stage2_id and evaluated != stage2_id:
        found.clashes.append(f"evaluation run {eval_run.info.run_id} evaluated training run {evaluated}, "
                             f"the version names {stage2_id}")
    return evaluation


def _data_sources(tags: dict[str, str], training: _Training, evaluation: RunSummary | str) -> dict[str, str]:
    """Where each recorded md5 comes from -> that md5: the version, the runs' tags and dataset inputs."""
    sources: dict[str, str] = {}
    if tags.get(TAG_DVC_MD5):
        sources[f"version tag {TAG_DVC_MD5}"] = tags[TAG_DVC_MD5]
    for r in ([training.job] if isinstance(training.job, RunSummary) else []) + training.runs:
        if r.data_md5:
            sources[f"{r.label} run tag"] = r.data_md5
        for i, digest in enumerate(r.dataset_digests):
            sources[f"{r.label} run dataset input" + (f" {i + 1}" if i else "")] = digest
    if isinstance(evaluation, RunSummary) and evaluation.data_md5:
        sources["evaluation run tag"] = evaluation.data_md5
    return sources


def _chosen_md5(tags: dict[str, str], sources: dict[str, str], found: _Findings) -> str | None:
    """The version's md5, else the best recorded one; every other record must agree with it."""
    chosen = tags.get(TAG_DVC_MD5)
    if not usable_md5(chosen):
        found.gap("data", missing(f"tag {TAG_DVC_MD5} on the version is {chosen!r}" if chosen
                                  else f"tag {TAG_DVC_MD5} not on the version"))
        preferred = [m for s, m in sources.items() if s.startswith("stage2")] + list(sources.values())
        chosen = next((m for m in preferred if usable_md5(m)), None)
    if chosen:
        found.clashes += [f"{source} records data {m}, not {chosen}" for source, m in sources.items()
                          if md5_key(m) != md5_key(chosen)]
    return chosen


def _data(reader: Reader, md5: str | None, rev_tag: str | None, found: _Findings
          ) -> tuple[list[GitRevision] | str, Validation | str, int]:
    """The data.dvc revisions holding `md5` and its newest validation (and how many there are)."""
    if not md5:
        return (found.gap("data", missing("no DVC md5 to look up in git")),
                found.gap("validation", missing("no DVC md5 to look up validations for")), 0)
    revisions = reader.revisions(md5)
    if isinstance(revisions, str):
        found.gap("data", revisions)
    if rev_tag and isinstance(revisions, list) and rev_tag not in {r.rev for r in revisions}:
        found.clashes.append(f"version tag {TAG_GIT_REV} names {rev_tag}, whose {DVC_FILE} does not hold {md5}")
    validations = reader.validations(md5)
    validation = validations[0] if validations else found.gap(
        "validation", missing(f"data {md5} was never validated (no run in experiment {VALIDATION_EXPERIMENT})"))
    return revisions, validation, len(validations)


def _promotions(tags: dict[str, str], held: list[str], found: _Findings) -> tuple[list[dict], list[dict]]:
    """One promotion record per alias on the version (an alias held without one is a gap), and the rollbacks."""
    promotions = [{"to": alias, **rec} for alias, rec in sorted(read_records(tags, PROMOTION).items())]
    for alias in held:
        if alias not in {p["to"] for p in promotions}:
            promotions.append({"to": alias, "missing": found.gap(
                "promotions", missing(f"alias {alias!r} points here but no {PROMOTION}.{alias} record"))})
    rollbacks = [{"alias": alias, **rec} for alias, rec in sorted(read_records(tags, ROLLBACK).items())]
    return promotions, rollbacks


def audit_model(ref: str | int, settings: Settings | None = None) -> ModelAudit:
    """Everything recorded about one registered version: a number, "v3", an alias, or a
    models:/ URI. ValueError if no such version or alias exists."""
    reader = Reader(settings)
    mv = _version(reader, ref)
    tags = dict(mv.tags or {})
    found = _Findings()
    if tags.get(TAG_IMPORTED):
        return _imported(reader, mv, tags, found)
    training = _training(reader, tags, found)
    evaluation = _evaluation(reader, tags, tags.get(TAG_TRAINING_RUN), found)
    sources = _data_sources(tags, training, evaluation)
    md5 = _chosen_md5(tags, sources, found)
    data_md5 = md5 or found.gap("data", missing("no record names a DVC md5 (the model was trained on "
                                                "unversioned data, or the tags were never written)"))
    revisions, validation, n_validations = _data(reader, md5, tags.get(TAG_GIT_REV), found)
    promotions, rollbacks = _promotions(tags, list(mv.aliases or []), found)
    return ModelAudit(
        model=mv.name, version=str(mv.version), aliases=sorted(mv.aliases or []),
        created=when(mv.creation_timestamp), source=mv.source, source_run=mv.run_id,
        training_run=training.run_id, tuning_job=training.job, training_runs=training.runs,
        data_md5=data_md5, data_sources=sources, data_git_rev_tag=tags.get(TAG_GIT_REV),
        data_revisions=revisions, validation=validation, validations=n_validations, evaluation=evaluation,
        promotions=promotions, rollbacks=rollbacks, approved_tasks=read_approved(tags), missing=found.gaps,
        disagreements=found.clashes, serving=serving_periods(tags), licences=read_licences(tags))


def _imported(reader: Reader, mv, tags: dict[str, str], found: _Findings) -> ModelAudit:
    """A version converted from a checkpoint trained elsewhere: where it came from, its
    evaluation and promotions; no SkyEye training or data version, by construction."""
    record = json.loads(tags[TAG_IMPORTED])
    outside = "none: imported (trained outside SkyEye)"
    evaluation = _evaluation(reader, tags, None, found) if tags.get(TAG_EVAL_RUN) else \
        "not evaluated yet (skyeye evaluate --model models:/...)"
    promotions, rollbacks = _promotions(tags, list(mv.aliases or []), found)
    return ModelAudit(
        model=mv.name, version=str(mv.version), aliases=sorted(mv.aliases or []), created=when(mv.creation_timestamp),
        source=mv.source, source_run=mv.run_id, training_run=outside, tuning_job=outside, training_runs=[],
        data_md5=outside, data_sources={}, data_git_rev_tag=None, data_revisions=outside, validation=outside,
        validations=0, evaluation=evaluation, promotions=promotions, rollbacks=rollbacks,
        approved_tasks=read_approved(tags), missing=found.gaps, disagreements=found.clashes, imported=record,
        serving=serving_periods(tags), licences=read_licences(tags))


# ---------------------------------------------------------------- data version -> models

def _data_md5(reader: Reader, rev: str) -> str:
    text = rev.strip()
    if MD5_RE.match(text.lower()):
        return text.lower()
    resolved = git(reader.root, "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}", check=False)
    if not text or resolved.returncode != 0:
        raise ValueError(f"{rev!r} is neither a DVC md5 nor a git revision of {reader.root}")
    sha = resolved.stdout.strip()
    dvc_text = dvc_file_at(reader.root, sha)
    if dvc_text is None:
        raise ValueError(f"git revision {rev!r} ({sha[:12]}) has no {DVC_FILE}")
    try:
        return parse_dvc_file(dvc_text, f"{DVC_FILE} at {rev}")["md5"]
    except VersioningError as exc:
        raise ValueError(str(exc)) from None


def audit_data(rev: str, settings: Settings | None = None) -> DataAudit:
    """Everything trained, evaluated and registered on one data version: a git revision
    (data.dvc read there) or a DVC md5 (with or without `.dir`)."""
    reader = Reader(settings)
    md5 = _data_md5(reader, rev)
    gaps: list[str] = []
    revisions = reader.revisions(md5)
    if isinstance(revisions, str):
        gaps.append(f"data: {revisions}")
    found = reader.validations(md5)
    validations: list[Validation] | str = found or missing(
        f"data {md5} was never validated (no run in experiment {VALIDATION_EXPERIMENT})")
    if not found:
        gaps.append(f"validation: {validations}")
    by_tag = [f"tags.`{TAG_DVC_MD5}` = '{v}'" for v in md5_variants(md5)]
    by_input = [f"datasets.digest = '{v}'" for v in md5_variants(md5)]
    tuning = sorted((reader.summary(r) for r in reader.search(TUNING_EXPERIMENT, by_tag + by_input)),
                    key=lambda r: (r.kind != KIND_TUNING_JOB, r.started or "", r.label))  # jobs first
    evaluations = [reader.summary(r, (PRIMARY_SCORE,)) for r in reader.search(EVALUATION_EXPERIMENT, by_tag)]

    name = model_name()
    trained_here = {r.run_id for r in tuning}
    refs: list[ModelVersionRef] = []
    for mv in reader.versions(name):
        t = mv.tags or {}
        tag = t.get(TAG_DVC_MD5)
        if tag and md5_key(tag) == md5_key(md5):
            how = f"tag {TAG_DVC_MD5}"
        elif t.get(TAG_TRAINING_RUN) in trained_here:
            how = f"its training run is tagged with this data (the version has {TAG_DVC_MD5}={tag!r})"
        else:
            continue
        refs.append(ModelVersionRef(str(mv.version), sorted(mv.aliases or []), t.get(TAG_TRAINING_RUN),
                                    t.get(TAG_EVAL_RUN), how))
    return DataAudit(md5=md5, asked=rev, revisions=revisions, validations=validations, tuning_runs=tuning,
                     evaluation_runs=evaluations, model=name, versions=refs, missing=gaps)
