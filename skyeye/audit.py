"""The audit: follow what MLflow, git and DVC recorded, from a registered SkyEyeGPT
version down to the data.dvc revision and its validation, and from a data version up
to every model trained on it.

It reads only those records (no side ledger that could drift). A link it cannot follow
(a missing tag, a deleted run, an md5 no commit of data.dvc holds, data never
validated) is reported as "missing: <why>" in place and listed in `.missing`; records
that contradict each other (a run's dataset digest against its tag, say) are listed in
`.disagreements`. Only an unknown version, alias or data revision raises (ValueError).

This module follows the links (`audit_model`, `audit_data`); the lookups themselves are
in skyeye.audit_reader, the records and results with their text and JSON forms in
skyeye.audit_records.
"""
from __future__ import annotations

import json
import re
from typing import Any

from mlflow.exceptions import MlflowException

from .audit_reader import TAG_PARENT, _Reader, _variants, _when
from .audit_records import (
    _MD5,
    DataAudit,
    GitRevision,
    ModelAudit,
    ModelVersionRef,
    RunSummary,
    Validation,
    _key,
    _usable,
    missing,
)
from .config import Settings
from .registry import (
    PROMOTION_FIELDS,
    TAG_EVAL_RUN,
    TAG_EVAL_TRAINING_RUN,
    TAG_TRAINING_RUN,
    TAG_TUNING_JOB,
    model_name,
)
from .tracking import TAG_DVC_MD5, TAG_GIT_REV, VALIDATION_EXPERIMENT
from .versioning import DVC_FILE, VersioningError, _dvc_file_at, _git, _parse_dvc_file

# Names the training and evaluation write (not imported from them: they pull in torch).
TUNING_EXPERIMENT = "skyeye-tuning"
EVALUATION_EXPERIMENT = "skyeye-evaluation"
TAG_INIT_RUN = "skyeye.init_run"  # on a stage-2 run: the stage-1 run whose result it started from
ROLLBACK_FIELDS = ("at", "from", "by")


# ---------------------------------------------------------------- model version -> data

def _parse_ref(ref: str | int, default_name: str) -> tuple[str, str | None, str | None]:
    """-> (model name, version or None, alias or None)."""
    text = str(ref).strip()
    name = default_name
    if text.startswith("models:/"):
        body = text.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, None, alias
        if "/" in body:
            name, text = body.rsplit("/", 1)
        else:
            raise ValueError(f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    if re.fullmatch(r"[vV]?\d+", text):
        return name, text.lstrip("vV"), None
    if not text:
        raise ValueError("empty model reference: give a version number or an alias")
    return name, None, text


def _version(reader: _Reader, ref: str | int) -> Any:
    name, version, alias = _parse_ref(ref, model_name())
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


def _records(tags: dict[str, str], prefix: str, fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`<prefix>.<alias>.<field>` tags -> {alias: {field: value}}; JSON values decoded."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(.+)\.({'|'.join(fields)})$")
    out: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        m = pattern.match(key)
        if m:
            try:
                decoded = json.loads(value) if value[:1] in "[{" else value
            except json.JSONDecodeError:
                decoded = value
            out.setdefault(m.group(1), {})[m.group(2)] = decoded
    return out


def audit_model(ref: str | int, settings: Settings | None = None) -> ModelAudit:
    """Everything recorded about one registered version: a number, "v3", an alias, or a
    models:/ URI. ValueError if no such version or alias exists."""
    reader = _Reader(settings)
    mv = _version(reader, ref)
    tags = dict(mv.tags or {})
    gaps: list[str] = []
    clashes: list[str] = []

    def gap(section: str, text: str) -> str:
        gaps.append(f"{section}: {text}")
        return text

    # Training: the stage-2 run on the version, its tuning job, the job's children.
    stage2_id = tags.get(TAG_TRAINING_RUN)
    stage2, why = reader.run(stage2_id, f"training run (tag {TAG_TRAINING_RUN})")
    training_run = stage2_id if why is None else gap("training", why)
    job_id = tags.get(TAG_TUNING_JOB)
    parent_of_stage2 = stage2.data.tags.get(TAG_PARENT) if stage2 else None
    if job_id and parent_of_stage2 and job_id != parent_of_stage2:
        clashes.append(f"tag {TAG_TUNING_JOB} says tuning job {job_id}, but training run {stage2_id} "
                       f"belongs to {parent_of_stage2}")
    if not job_id and parent_of_stage2:
        gap("training", missing(f"tag {TAG_TUNING_JOB} not on the version; the tuning job was found as "
                                f"the training run's parent"))
        job_id = parent_of_stage2
    job, why = reader.run(job_id, f"tuning job (tag {TAG_TUNING_JOB})")
    tuning_job: RunSummary | str = reader.summary(job, ()) if job else gap("training", why)
    if job and why:
        gap("training", why)
    training_runs: list[RunSummary] = []
    if job:
        children = reader.children(job.info.run_id, job.info.experiment_id)
        training_runs = [reader.summary(r) for r in children]
        for r in training_runs:
            if r.deleted and r.run_id != stage2_id:
                gap("training", missing(f"{r.label} run {r.run_id} of the tuning job was deleted"))
        stages = {r.stage for r in training_runs if r.kind == "tuning-stage"}
        init_id = stage2.data.tags.get(TAG_INIT_RUN) if stage2 else None
        if "1" not in stages and init_id:  # stage 1 ran as its own job: follow the stage-2 run's start point
            init_run, why = reader.run(init_id, f"stage-1 run (tag {TAG_INIT_RUN} of the stage-2 run)")
            if init_run:
                training_runs.append(reader.summary(init_run))
                stages.add("1")
            else:
                gap("training", why)
        for n in ("1", "2"):
            if n not in stages:
                gap("training", missing(f"no stage-{n} run under tuning job {job.info.run_id}"))
        if stage2_id and stage2_id not in {r.run_id for r in training_runs} and stage2:
            training_runs.append(reader.summary(stage2))
    elif stage2:
        training_runs = [reader.summary(stage2)]

    # Evaluation.
    eval_run, why = reader.run(tags.get(TAG_EVAL_RUN), f"evaluation run (tag {TAG_EVAL_RUN})")
    evaluation: RunSummary | str = gap("evaluation", why) if why else ""
    if eval_run:
        from .evaluation.benchmarks import primary_of
        evaluation = reader.summary(eval_run, None)
        metrics = eval_run.data.metrics
        evaluation.metrics = {k: v for k, v in
                              [("primary_score", metrics.get("primary_score")), *primary_of(metrics).items()]
                              if v is not None}
        if eval_run.info.status != "FINISHED" or "primary_score" not in metrics:
            gap("evaluation", missing(f"evaluation run {eval_run.info.run_id} is incomplete (status "
                                      f"{eval_run.info.status}, primary_score {metrics.get('primary_score')})"))
        evaluated = eval_run.data.tags.get(TAG_EVAL_TRAINING_RUN)
        if evaluated and stage2_id and evaluated != stage2_id:
            clashes.append(f"evaluation run {eval_run.info.run_id} evaluated training run {evaluated}, "
                           f"the version names {stage2_id}")

    # Data: the md5 every record names; they must agree.
    sources: dict[str, str] = {}
    if tags.get(TAG_DVC_MD5):
        sources[f"version tag {TAG_DVC_MD5}"] = tags[TAG_DVC_MD5]
    for r in ([tuning_job] if isinstance(tuning_job, RunSummary) else []) + training_runs:
        if r.data_md5:
            sources[f"{r.label} run tag"] = r.data_md5
        for i, digest in enumerate(r.dataset_digests):
            sources[f"{r.label} run dataset input" + (f" {i + 1}" if i else "")] = digest
    if isinstance(evaluation, RunSummary) and evaluation.data_md5:
        sources["evaluation run tag"] = evaluation.data_md5
    chosen = tags.get(TAG_DVC_MD5)
    if not _usable(chosen):
        gap("data", missing(f"tag {TAG_DVC_MD5} on the version is {chosen!r}" if chosen
                            else f"tag {TAG_DVC_MD5} not on the version"))
        preferred = [m for s, m in sources.items() if s.startswith("stage2")] + list(sources.values())
        chosen = next((m for m in preferred if _usable(m)), None)
    if chosen:
        for source, m in sources.items():
            if _key(m) != _key(chosen):
                clashes.append(f"{source} records data {m}, not {chosen}")
    data_md5 = chosen or gap("data", missing("no record names a DVC md5 (the model was trained on "
                                             "unversioned data, or the tags were never written)"))
    n_validations = 0
    if not chosen:
        revisions: list[GitRevision] | str = gap("data", missing("no DVC md5 to look up in git"))
        validation: Validation | str = gap("validation", missing("no DVC md5 to look up validations for"))
    else:
        revisions = reader.revisions(chosen)
        if isinstance(revisions, str):
            gap("data", revisions)
        rev_tag = tags.get(TAG_GIT_REV)
        if rev_tag and isinstance(revisions, list) and rev_tag not in {r.rev for r in revisions}:
            clashes.append(f"version tag {TAG_GIT_REV} names {rev_tag}, whose {DVC_FILE} does not hold {chosen}")
        found = reader.validations(chosen)
        n_validations = len(found)
        validation = found[0] if found else gap(
            "validation", missing(f"data {chosen} was never validated (no run in experiment {VALIDATION_EXPERIMENT})"))

    # Promotions: one record per alias on the version; an alias held without one is a gap.
    promoted = _records(tags, "skyeye.promotion", PROMOTION_FIELDS)
    promotions = [{"to": alias, **rec} for alias, rec in sorted(promoted.items())]
    for alias in mv.aliases or []:
        if alias not in {p["to"] for p in promotions}:
            promotions.append({"to": alias, "missing": gap(
                "promotions", missing(f"alias {alias!r} points here but no skyeye.promotion.{alias}.* tags"))})
    rolled = _records(tags, "skyeye.rollback", ROLLBACK_FIELDS)
    rollbacks = [{"alias": alias, **rec} for alias, rec in sorted(rolled.items())]

    return ModelAudit(
        model=mv.name, version=str(mv.version), aliases=sorted(mv.aliases or []),
        created=_when(mv.creation_timestamp), source=mv.source, source_run=mv.run_id,
        training_run=training_run, tuning_job=tuning_job, training_runs=training_runs,
        data_md5=data_md5, data_sources=sources, data_git_rev_tag=tags.get(TAG_GIT_REV),
        data_revisions=revisions, validation=validation, validations=n_validations, evaluation=evaluation,
        promotions=promotions, rollbacks=rollbacks, missing=gaps, disagreements=clashes)


# ---------------------------------------------------------------- data version -> models

def _data_md5(reader: _Reader, rev: str) -> str:
    text = rev.strip()
    if _MD5.match(text.lower()):
        return text.lower()
    resolved = _git(reader.root, "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}", check=False)
    if not text or resolved.returncode != 0:
        raise ValueError(f"{rev!r} is neither a DVC md5 nor a git revision of {reader.root}")
    sha = resolved.stdout.strip()
    dvc_text = _dvc_file_at(reader.root, sha)
    if dvc_text is None:
        raise ValueError(f"git revision {rev!r} ({sha[:12]}) has no {DVC_FILE}")
    try:
        return _parse_dvc_file(dvc_text, f"{DVC_FILE} at {rev}")["md5"]
    except VersioningError as exc:
        raise ValueError(str(exc)) from None


def audit_data(rev: str, settings: Settings | None = None) -> DataAudit:
    """Everything trained, evaluated and registered on one data version: a git revision
    (data.dvc read there) or a DVC md5 (with or without `.dir`)."""
    reader = _Reader(settings)
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
    by_tag = [f"tags.`{TAG_DVC_MD5}` = '{v}'" for v in _variants(md5)]
    by_input = [f"datasets.digest = '{v}'" for v in _variants(md5)]
    tuning = sorted((reader.summary(r) for r in reader.search(TUNING_EXPERIMENT, by_tag + by_input)),
                    key=lambda r: (r.kind != "tuning-job", r.started or "", r.label))  # jobs first
    evaluations = [reader.summary(r, ("primary_score",)) for r in reader.search(EVALUATION_EXPERIMENT, by_tag)]

    name = model_name()
    trained_here = {r.run_id for r in tuning}
    refs: list[ModelVersionRef] = []
    for mv in reader.versions(name):
        t = mv.tags or {}
        tag = t.get(TAG_DVC_MD5)
        if tag and _key(tag) == _key(md5):
            how = f"tag {TAG_DVC_MD5}"
        elif t.get(TAG_TRAINING_RUN) in trained_here:
            how = f"its training run is tagged with this data (the version has {TAG_DVC_MD5}={tag!r})"
        else:
            continue
        refs.append(ModelVersionRef(str(mv.version), sorted(mv.aliases or []), t.get(TAG_TRAINING_RUN),
                                    t.get(TAG_EVAL_RUN), how))
    return DataAudit(md5=md5, asked=rev, revisions=revisions, validations=validations, tuning_runs=tuning,
                     evaluation_runs=evaluations, model=name, versions=refs, missing=gaps)
