"""The library's commands of `skyeye`. Thin: parse arguments, call the library, print results.
The console script is `flows/cli.py`, which adds the commands that drive Prefect (serve,
schedule, server) to this app; nothing here imports the flows.

Every command works on the embedded defaults (paths under the project, SQLite MLflow
under mlruns/, the committed local DVC remote); SKYEYE_* and the services' own
environment variables point it elsewhere.
"""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .commands.ablation import ablation
from .commands.canary import canary_app
from .commands.checkpoints import export, import_app
from .commands.console import console, fail, say
from .commands.doctor import doctor
from .commands.errors import DEBUG_ENV, HandledGroup
from .commands.inputs import existing_file, existing_folder, image_file, in_range, writable_folder
from .commands.log import log_app
from .config import (
    DEFAULT_MODEL_FILE,
    REGISTERED_MODEL,
    STAGE_FILE,
    WORKERS_PER_STAGE,
    configure_environment,
    get_settings,
)
from .formats.benchmarks import VALIDATION
from .tracking.names import read_approved, read_licences

if TYPE_CHECKING:
    from .datagate.versioning import VersionReport

# The commands import the rest of the library inside their bodies: each part costs tens of
# milliseconds to seconds (torch, MLflow, Ray, DVC, Great Expectations, PIL), which `skyeye --help`
# and a command that needs none of it should not wait for. What costs nothing is imported above.

# rich_markup_mode=None: help texts hold task identifiers such as [refer], which rich
# markup would swallow as tags. HandledGroup: every command's errors end as commands/errors.py says.
app = typer.Typer(help="SkyEye: train, evaluate, ship and retrain SkyEyeGPT, a remote-sensing multimodal LLM.\n\n"
                       f"An error is reported in a line or two naming the input at fault; --debug (or {DEBUG_ENV}=1) "
                       "shows the full Python traceback instead, and an unexpected error's traceback is also "
                       "written under .skyeye/logs/.",
                  cls=HandledGroup, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)
data_app = typer.Typer(help="The data layer: SkyEye-Synth, readers, instruction builder, DVC versions, the data gate.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
# Called with the VersionReport of a committed `data version`; each returns a line to print or
# None. The orchestration side (flows/cli.py) adds the "data versioned" event that a scheduled
# retrain starts on.
on_data_committed: list[Callable[[VersionReport], str | None]] = []
app.command("doctor")(doctor)
app.command("ablation")(ablation)
app.add_typer(import_app, name="import")
app.command("export")(export)
app.add_typer(log_app, name="log")
app.add_typer(canary_app, name="canary")


@app.callback()
def _main(debug: Annotated[bool, typer.Option(
        "--debug", help=f"Show the full Python traceback of an error (as {DEBUG_ENV}=1 does).")] = False) -> None:
    # --debug is read by HandledGroup (commands/errors.py), around every command
    configure_environment()
    # deprecation notices of the pinned libraries say nothing to someone asking a question
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@data_app.command("synth")
def synth(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: data/synth).")] = None,
    scale: Annotated[str, typer.Option(
        help="tiny (seconds, tests) | demo (the demo corpus) | full (about the real sets' sizes).")] = "demo",
    seed: Annotated[int, typer.Option(help="Same seed and scale give byte-identical files.")] = 0,
    workers: Annotated[Optional[int], typer.Option(
        callback=in_range(1), help="Processes (default: all cores).")] = None,
) -> None:
    """Write SkyEye-Synth: procedural RS scenes in the 8 benchmarks' native layouts (synthetic, not real imagery)."""
    from .synth.corpus import SCALES, synthesize
    if scale not in SCALES:
        fail(f"--scale {scale}: choose one of {', '.join(SCALES)}")
    out = writable_folder(out or get_settings().synth_dir, "--out")
    start = time.perf_counter()
    try:
        summary = synthesize(out, scale=scale, seed=seed, workers=workers)
    except ValueError as err:
        fail(str(err))
    console.print(f"SkyEye-Synth ({scale}, seed {seed}) written to {out} in {time.perf_counter() - start:.1f} s")
    for bench, splits in summary.items():
        console.print(f"  {bench:16s} " + ", ".join(f"{s}={n}" for s, n in splits.items()))


@data_app.command("build")
def build(
    root: Annotated[Optional[Path], typer.Option(
        help="Folder holding benchmark folders (default: data/synth).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: data/instructions).")] = None,
    source: Annotated[Optional[list[str]], typer.Option(
        help="NAME=PATH (repeatable): a benchmark folder from elsewhere (a real download; it replaces the "
             "synthetic one), or NAME=FILE.json, an instruction set in the LLaVA format (with --images).")] = None,
    images: Annotated[Optional[list[str]], typer.Option(
        help="[NAME=]DIR (repeatable): the folder a LLaVA source's image paths are relative to; NAME= may be "
             "left out when there is one LLaVA source.")] = None,
    box_format: Annotated[Optional[list[str]], typer.Option(
        help="NAME=FORMAT: how a LLaVA source writes boxes: grid100, unit (0-1), grid1000 or pixels "
             "(default: inferred, docs/data.md).")] = None,
    licence: Annotated[Optional[list[str]], typer.Option(
        help="NAME=TEXT: a source's licence or terms, e.g. 'geochat=CC BY-NC 4.0' (default: unknown for a "
             "LLaVA set; a benchmark's as recorded).")] = None,
) -> None:
    """Build stage-1 instructions, stage-2 conversations, evaluation files and the data card."""
    from .commands.sources import parse_sources
    from .data.instructions import build as build_instructions
    from .data.records import DataFormatError
    from .datagate.leakage import LEAKAGE_FILE, configured
    s = get_settings()
    root, out = existing_folder(root or s.synth_dir, "--root"), writable_folder(out or s.instructions_dir, "--out")
    sources = parse_sources(source or [], images or [], box_format or [], licence or [])
    start = time.perf_counter()
    try:
        leakage, cache = configured(s)
        card = build_instructions(root, out, sources, leakage=leakage, hash_cache=cache)
    except (ValueError, DataFormatError, FileNotFoundError) as err:
        fail(str(err))
    console.print(f"built in {time.perf_counter() - start:.1f} s: stage1={card['stage1']['total']} "
                  f"stage2={card['stage2']['total']} eval files={len(card['eval'])} -> {out}")
    if pairs := card["leakage"]["pairs"]:
        dropped = sum(card["leakage"]["dropped"].values())
        say(f"  leakage: {len(pairs)} eval/training image pairs ({out / LEAKAGE_FILE}); "
            + (f"{dropped} training samples dropped" if dropped else "kept: the data gate will fail"))
    for line in card["reports"]:
        if "skipped" in line or "clipped" in line:
            say(f"  {line}")
    by_licence: dict[str, list[str]] = {}
    for src, lic in card["licences"].items():
        by_licence.setdefault(lic, []).append(src)
    console.print("licences: " + "; ".join(f"{lic} ({', '.join(srcs)})" for lic, srcs in by_licence.items()),
                  markup=False, soft_wrap=True)


@data_app.command("inspect")
def inspect(folder: Path, name: Annotated[Optional[str], typer.Option(
    help="Benchmark name if the layout cannot be told from the folder.")] = None,
    media: Annotated[Optional[Path], typer.Option(
        help="CapERA: the folder holding ERA's videos (<media>/<split>/...), when not under FOLDER; a LLaVA "
             "file: its images folder.")] = None,
    box_format: Annotated[str, typer.Option(
        help="A LLaVA file: grid100, unit, grid1000, pixels or auto (docs/data.md).")] = "auto",
) -> None:
    """Read one benchmark folder (real download or SkyEye-Synth), or a LLaVA instruction file, and report
    what was kept and skipped, per split."""
    from .data.readers import detect_benchmark, read_benchmark
    from .data.records import DataFormatError
    if folder.suffix.lower() == ".json":
        from .data.llava import read_llava
        existing_file(folder, "FOLDER")
        if media is None:
            fail(f"{folder}: a LLaVA file; --media DIR names the folder its image paths are relative to")
        try:
            samples, report, used = read_llava(name or folder.stem, folder, existing_folder(media, "--media"),
                                               box_format)
        except (ValueError, DataFormatError) as err:
            fail(str(err))
        say(report.summary())
        say(f"  box notation: {used}{' (inferred)' if box_format == 'auto' else ''}; tasks: "
            + ", ".join(f"{t}={n}" for t, n in sorted(Counter(s.task for s in samples).items())))
        return
    existing_folder(folder, "FOLDER")
    name = name or detect_benchmark(folder)
    if not name:
        fail(f"{folder}: not a known benchmark layout; pass --name")
    try:
        samples, report = read_benchmark(name, folder, media=media)
    except (ValueError, DataFormatError, FileNotFoundError) as err:
        fail(str(err))
    say(report.summary())
    for line in report.by_split():
        say(f"  {line}")


@data_app.command("version")
def version(
    commit: Annotated[bool, typer.Option("--commit", help="Also git-commit data.dvc.")] = False,
    message: Annotated[Optional[str], typer.Option("-m", "--message", help="Commit message with --commit.")] = None,
) -> None:
    """Record the current data/ as a DVC version (add + push) and say what changed."""
    from .datagate.versioning import VersioningError, ensure_dvc, version_data
    root = get_settings().project_root
    try:
        ensure_dvc(root)
        report = version_data(root, commit=commit, message=message)
    except VersioningError as err:
        fail(str(err))
    say(report.render())
    if commit:
        for announce in on_data_committed:
            if line := announce(report):
                say(line)


@data_app.command("history")
def history(limit: Annotated[int, typer.Option(
        callback=in_range(1), help="Most recent versions to list.")] = 50) -> None:
    """List data versions: git revision, DVC hash, sample counts, validation outcome."""
    from .datagate.gate import validation_outcome
    from .datagate.versioning import VersioningError, render_history
    from .datagate.versioning import history as data_history
    try:
        entries = data_history(get_settings().project_root, validation_lookup=validation_outcome, limit=limit)
    except VersioningError as err:
        fail(str(err))
    say(render_history(entries))


@data_app.command("checkout")
def checkout(rev: str, force: Annotated[bool, typer.Option(help="Overwrite local changes in data/.")] = False) -> None:
    """Restore data/ to the version recorded in data.dvc at git revision REV."""
    from .datagate.versioning import VersioningError, checkout_data
    try:
        restored = checkout_data(get_settings().project_root, rev, force=force)
    except VersioningError as err:
        fail(str(err))
    say(f"data/ restored: {restored.render()}")


@data_app.command("validate")
def validate(
    data: Annotated[Optional[Path], typer.Option(help="Instruction folder (default: data/instructions).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    record: Annotated[bool, typer.Option(help="Store the result in MLflow with the data version.")] = True,
) -> None:
    """Run the Great Expectations gate; exits 1 if any expectation fails."""
    from .datagate.gate import run_gate
    result, run_id = run_gate(existing_folder(data or get_settings().instructions_dir, "--data"), record=record)
    if json_out:
        print(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        say(result.render())
        if run_id:
            console.print(f"recorded in MLflow run {run_id}")
    if not result.success:
        raise typer.Exit(1)


MODEL_OPT = Annotated[Path, typer.Option("--model", help="Model config (configs/model/*.yaml).")]


@app.command("backbones")
def backbones(model: MODEL_OPT = Path(DEFAULT_MODEL_FILE)) -> None:
    """Pretrain (or reuse from the cache) the tiny offline backbones the model config asks for."""
    from .training.jobs import prepare_backbones
    existing_file(model, "--model")
    try:
        paths = prepare_backbones(model)
    except ValueError as err:
        fail(str(err))
    say(json.dumps(paths, indent=1))


@app.command("train")
def train(
    stage: Annotated[int, typer.Option(
        help="1: single-task instructions; 2: multi-task conversations (needs --init).")],
    model: MODEL_OPT = Path(DEFAULT_MODEL_FILE),
    config: Annotated[Optional[Path], typer.Option(
        help=f"Stage config (default {STAGE_FILE.format(stage='<N>')}).")] = None,
    init: Annotated[Optional[str], typer.Option(
        help="Stage-1 result (stage 2): model folder, tuning-stage run id or models:/ URI.")] = None,
    num_workers: Annotated[int, typer.Option(
        callback=in_range(1), help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU).")] = WORKERS_PER_STAGE,
    gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per worker, NCCL.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Plain single process, no Ray.")] = False,
) -> None:
    """Run one tuning stage on Ray Train (local Ray, or RAY_ADDRESS), tracked in MLflow."""
    from .model.references import model_folder
    from .training.jobs import prepare_backbones, train_stage
    from .training.stage_config import load_stage_config
    if stage not in (1, 2):
        fail(f"--stage {stage}: must be 1 or 2")
    config = existing_file(config or Path(STAGE_FILE.format(stage=stage)), "--config")
    existing_file(model, "--model")
    # what needs no compute, before the backbones (which may be pretrained here); a config's
    # ValueError names its file and reaches the user through commands/errors.py
    if (declared := load_stage_config(config).stage) != stage:
        fail(f"--config {config}: a stage-{declared} config, but --stage is {stage}")
    if stage == 2 and not init:
        fail("--init: stage 2 needs a stage-1 result (a model folder, tuning-stage run id or models:/ URI)")
    if init:
        try:
            model_folder(init)
        except ValueError as err:
            fail(f"--init {err}")
    try:
        paths = prepare_backbones(model, init=model_folder(init) if init else None)
        result = train_stage(stage, model, config, paths, init=init, num_workers=num_workers, use_gpu=gpu,
                             local=local)
    except ValueError as err:
        fail(str(err))
    say(f"stage {stage} done: MLflow run {result.run_id}\nmodel: {result.model_dir}")
    say(json.dumps({k: round(v, 4) for k, v in result.metrics.items()
                     if k.startswith(VALIDATION) or k == "loss"}, indent=1))


@app.command("evaluate")
def evaluate(
    model: Annotated[str, typer.Option(
        "--model", help=f"Model folder, tuning-stage run id, or models:/{REGISTERED_MODEL}@<alias> (or /<version>).")],
    benchmarks: Annotated[str, typer.Option(
        help="all, or a comma list of benchmarks / bench splits (e.g. rsvg_val).")] = "all",
    limit: Annotated[Optional[int], typer.Option(
        callback=in_range(1), help="At most N samples per bench split (spread over the file).")] = None,
    baselines: Annotated[bool, typer.Option(help="Also score the untuned model and the trivial answers.")] = True,
    data: Annotated[Optional[Path], typer.Option(help="Instruction folder (default: data/instructions).")] = None,
    num_workers: Annotated[int, typer.Option(
        help="1: evaluate in this process. N > 1: cut every bench split into N shards answered by N Ray workers "
             "(local Ray, or RAY_ADDRESS's cluster), each loading the model once; same scores, one MLflow run.")] = 1,
    on: Annotated[str, typer.Option(
        help="test: the scored splits (a registry candidate's run). validation: the validation splits, for "
             "choosing a recipe without reading the test splits (experiment skyeye-evaluation-on-validation).")
    ] = "test",
) -> None:
    """Score a model on the 8 benchmarks (paper prompts and metrics), with baselines, in one MLflow run."""
    from .evaluation.runner import run_evaluation
    from .model.references import RegistryError
    if num_workers < 1:
        fail(f"--num-workers {num_workers}: must be 1 (in this process) or more (that many Ray workers)")
    if data:
        existing_folder(data, "--data")
    try:
        result = run_evaluation(model, benchmarks, limit=limit, baselines=baselines, instructions=data,
                                num_workers=num_workers, on=on)
    except RegistryError as err:
        fail(f"--model {err}")
    except (ValueError, FileNotFoundError) as err:  # DataFormatError is a ValueError
        fail(str(err))
    say(result.render())
    if model.strip().startswith("models:/") and on == "test" and benchmarks == "all" and limit is None:
        from .model.references import resolve_version
        from .registry.store import attach_evaluation
        version = resolve_version(model)
        if attach_evaluation(version, result.run_id):  # a version without one: an imported checkpoint
            say(f"version {version} had no evaluation: this run now stands behind it (promotion reads it)")


@app.command("register")
def register(
    eval_run: Annotated[str, typer.Option("--eval-run", help="The FINISHED evaluation run of the model.")],
    model_dir: Annotated[Optional[Path], typer.Option(
        help="Model folder (default: the one the evaluation run scored).")] = None,
) -> None:
    """Log the evaluated SkyEyeGPT as one pyfunc model and register it under the registered model's name."""
    from .model.references import model_name
    from .registry.store import register as register_model
    if model_dir:
        existing_folder(model_dir, "--model-dir")
    try:
        version = register_model(model_dir, eval_run)
    except ValueError as err:
        fail(str(err))
    say(f"registered {model_name()} version {version}")


@app.command("promote")
def promote(
    version: Annotated[str, typer.Option(help="Version number (or v3, or an alias).")],
    to: Annotated[str, typer.Option(help="staging | production")],
    force: Annotated[bool, typer.Option("--force", help="Override a refusal (needs --reason; recorded).")] = False,
    reason: Annotated[Optional[str], typer.Option(help="Why (recorded on the version).")] = None,
) -> None:
    """Move an alias to a version if configs/promotion.yaml allows; a refusal names each benchmark that failed."""
    from .registry.promotion import promote as promote_version
    try:
        say(promote_version(version, to, force=force, reason=reason).render())
    except ValueError as err:
        fail(str(err))


@app.command("rollback")
def rollback(
    alias: Annotated[str, typer.Option(help="The alias to put back on its previous version.")] = "production",
    reason: Annotated[Optional[str], typer.Option(help="Why (recorded on the version).")] = None,
) -> None:
    """Put the previous production (or other alias) version back, in one command."""
    from .model.references import model_name
    from .registry.promotion import rollback as rollback_alias
    try:
        before, after = rollback_alias(alias, reason)
    except ValueError as err:
        fail(str(err))
    say(f"{model_name()}@{alias}: version {before} -> version {after}")


@app.command("models")
def models(
    version: Annotated[Optional[str], typer.Argument(
        help="A version (3, v3, production): its scores with 95% intervals and, per bench split, better / no "
             "significant difference / worse than its trivial baseline and than production.")] = None,
) -> None:
    """Registered versions with their aliases, key scores and data version; or one version's comparisons."""
    from .registry.store import list_versions, render_versions
    if version is None:
        say(render_versions(list_versions()))
        return
    from .model.references import RegistryError, aliases, model_name, resolve_version
    from .registry.promotion import scoreboard
    from .tracking import runs
    try:
        v = resolve_version(version)
        production = aliases(runs.client(), model_name()).get("production")
        rows = scoreboard(v, production if production != v else None)
        tags = runs.client().get_model_version(model_name(), str(v)).tags
        approved, licences = read_approved(tags), read_licences(tags)
    except RegistryError as err:
        fail(str(err))
    say(f"{model_name()} version {v}" + (f" against production (version {production})" if production not in (None, v)
                                         else "") + "; [95% interval], paired differences on the same test items")
    say("approved for: " + ("not recorded (registered before approvals were recorded)" if approved is None
                            else ", ".join(approved) or "no task")
        + " (a task: better than its trivial baseline on every split of the task)")
    say("licences of its data: " + (", ".join(f"{k}: {x}" for k, x in sorted(licences.items())) if licences
                                    else "not recorded (registered before licences were recorded)"))
    cols = [c for c in ("benchmark", "metric", "candidate", "trivial baseline", "vs trivial", "production",
                        "vs production") if any(c in r for r in rows)]
    width = {c: max(len(c), *(len(str(r.get(c) or "")) for r in rows)) for c in cols}
    say("  ".join(f"{c:{width[c]}s}" for c in cols))
    for r in rows:
        say("  ".join(f"{str(r.get(c) or ''):{width[c]}s}" for c in cols))


@app.command("audit")
def audit(
    model: Annotated[Optional[str], typer.Option(
        help="Model version, alias or models:/ URI (default: production).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data version: a git revision of data.dvc or a DVC md5.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the audit as JSON.")] = False,
) -> None:
    """What a model saw and who shipped it (or: every model trained on a data version), from MLflow, git and DVC."""
    from .audit.chain import audit_data, audit_model
    if model and data:
        fail("give --model or --data, not both")
    try:
        result = audit_data(data) if data else audit_model(model or "production")
    except ValueError as err:
        fail(str(err))
    say(json.dumps(result.to_dict(), indent=1, default=str) if json_out else result.render())


@app.command("chat")
def chat(
    question: Annotated[str, typer.Argument(
        help='A task identifier and an instruction, e.g. "[refer] the white airplane at the top left", "[vqa] how '
             'many ships are there?", "[caption] Briefly describe this image."')],
    image: Annotated[Path, typer.Option(help="Image file (or an MP4 clip).")],
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Model folder, tuning-stage run id or models:/ URI "
                        f"(default: models:/{REGISTERED_MODEL}@production).")] = None,
) -> None:
    """Ask SkyEyeGPT one question about one image and print the answer."""
    from .model.references import load, production_uri
    image_file(image, "--image")  # before the model loads
    try:
        m = load(model or production_uri()).model
    except ValueError as err:
        fail(f"--model {err}")
    from PIL import Image
    if image.suffix.lower() == ".mp4":
        from .synth.video import read_frames
        frames = read_frames(image, m.cfg.vision.video_frames)
    else:
        frames = [Image.open(image)]
    answer = m.ask([question], [len(frames)], m.preprocess(frames))[0]
    say(answer)
