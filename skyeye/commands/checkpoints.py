"""`skyeye import minigpt-v2` and `skyeye export`: the authors' SkyEyeGPT (a MiniGPT-v2
checkpoint) in as a registered version, a SkyEye model out as a checkpoint MiniGPT-v2's own
code loads (`skyeye.model.minigpt_v2`)."""
from __future__ import annotations

# imports inside functions: torch, peft and MLflow load when a command runs, not at `skyeye --help`
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import get_settings
from .console import fail, say
from .inputs import existing_file, existing_folder

MINIGPT_V2_CONFIG = "configs/model/minigpt_v2.yaml"
FORMATS = ("minigpt-v2",)
import_app = typer.Typer(help="Bring a checkpoint trained outside SkyEye in as a registered version.",
                         no_args_is_help=True, rich_markup_mode=None)


def _digest(path: Path) -> str:
    """sha256 of a weights file, or of a folder's files (name and sha256 of each, sorted)."""
    import hashlib

    from ..model.minigpt_v2 import sha256
    if path.is_file():
        return sha256(path)
    lines = [f"{f.relative_to(path)} {sha256(f)}" for f in sorted(path.rglob("*"))
             if f.is_file() and not f.name.startswith(".")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@import_app.command("minigpt-v2")
def import_minigpt_v2(
    checkpoint: Annotated[Path, typer.Argument(help="The MiniGPT-v2 checkpoint (the authors' SkyEyeGPT .pth).")],
    vision: Annotated[Path, typer.Option(help="LAVIS's EVA ViT-g weights, eva_vit_g.pth.")],
    llm: Annotated[Path, typer.Option(help="The LLaMA-2-7B chat folder (Hugging Face format, with its tokenizer).")],
    name: Annotated[Optional[str], typer.Option(help="A name for the import (default: the checkpoint's stem).")]
    = None,
    model: Annotated[Path, typer.Option(help="The model config the checkpoint was trained under.")]
    = Path(MINIGPT_V2_CONFIG),
    licence: Annotated[str, typer.Option(
        help="The checkpoint's licence or terms as its authors state them, e.g. 'research use only'; recorded on "
             "the version as its data's licence (`unknown`: SkyEye cannot tell what it was trained on).")]
    = "unknown",
) -> None:
    """Convert the checkpoint (tensors only; every key and shape checked against --model) and register
    it as a version tagged with the file it came from; its backbones stay references with their sha256."""
    from ..model.config import load_model_config
    from ..model.minigpt_v2 import import_checkpoint
    from ..registry.store import register_imported
    existing_file(checkpoint, "CHECKPOINT")
    existing_file(vision, "--vision")
    existing_folder(llm, "--llm")
    existing_file(model, "--model")
    label = name or checkpoint.stem
    out = get_settings().state / "imports" / label
    try:
        cfg = load_model_config(model)
        record = {"format": "minigpt-v2", "name": label} | import_checkpoint(checkpoint, vision, llm, cfg, out)
        version = register_imported(out, record, {"vision": _digest(vision), "llm": _digest(llm)},
                                    {f"imported {label}": licence.strip() or "unknown"})
    except ValueError as err:
        fail(str(err))
    say(f"imported {checkpoint.name} (sha256 {record['sha256'][:12]}) as {out}\nregistered version {version}; "
        f"next: skyeye evaluate --model models:/{_name()}/{version}")


def _name() -> str:
    from ..model.references import model_name
    return model_name()


def export(
    version: Annotated[str, typer.Argument(help="A version (3, v3), alias, models:/ URI or model folder.")],
    out: Annotated[Path, typer.Argument(help="The checkpoint file to write (.pth).")],
    format: Annotated[str, typer.Option("--format", help="minigpt-v2: what MiniGPT-v2's code loads.")]  # noqa: A002
    = "minigpt-v2",
) -> None:
    """Write a model's alignment layer and LoRA as a checkpoint the authors' code loads
    (`torch.load(...)["model"]`, strict=False), so a model tuned in SkyEye runs in their demo."""
    from ..model.minigpt_v2 import export_checkpoint
    from ..model.references import RegistryError
    if format not in FORMATS:
        fail(f"--format {format!r}: known formats: {', '.join(FORMATS)}")
    if out.is_dir():
        fail(f"OUT {out}: a folder; give the checkpoint file to write")
    try:
        folder = _local_folder(version)
        export_checkpoint(folder, out)
    except RegistryError as err:
        fail(f"VERSION {err}")
    except ValueError as err:
        fail(str(err))
    say(json.dumps({"written": str(out), "from": str(folder), "format": format}))


def _local_folder(ref: str) -> Path:
    """The saved model behind `ref`: a folder as it is; a version's registered artifact otherwise."""
    import mlflow

    from ..model.references import URI_PREFIX, RegistryError, model_name, resolve_version
    if Path(ref).is_dir():
        return Path(ref)
    uri = f"{URI_PREFIX}{model_name()}/{resolve_version(ref)}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as err:  # noqa: BLE001 - a registry failure, reported with the reference
        raise RegistryError(f"{ref}: cannot download its model ({err})") from None
    return local / "artifacts" / "model"
