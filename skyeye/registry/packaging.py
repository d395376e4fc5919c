"""SkyEyeGPT as an MLflow pyfunc model: the `SkyEyeGPTModel` wrapper, the request format
(`decode_image`, `model_signature`, `input_example`), the pinned requirements and the
staging of the trained parts as artifacts.

Kept apart from the registry so that what a served model runs is small and stands
alone: the pyfunc is logged with `code_paths` of the skyeye package and loaded back by
this module's path (`skyeye.registry.packaging.SkyEyeGPTModel`), and nothing here reads
the registry. A model folder or example image that cannot be packaged raises
`PackagingError` (a ValueError), which `skyeye.registry.store.register` reports as its
RegistryError; a bad request raises ValueError naming the row and column.
"""
from __future__ import annotations

# imports inside functions: torch, the model and PIL load only where a model is packaged, loaded or drawn
import base64
import binascii
import io
import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from ..model.config import ModelConfig

EXAMPLE_PROMPT = "[refer] the white airplane at the top left"


class PackagingError(ValueError):
    """A model folder or example image that cannot be packaged as the pyfunc."""


def decode_image(value, row: int):
    """A request's image: a local file path or base64 PNG/JPEG bytes (a data: URL too)."""
    from PIL import Image
    where = f"row {row}, column 'image'"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: empty; expected base64-encoded PNG/JPEG bytes or a local file path")
    text = value.strip()
    try:
        is_file = Path(text).is_file()
    except (OSError, ValueError):  # base64 text too long for a file name
        is_file = False
    if is_file:
        try:
            return Image.open(text).convert("RGB")
        except OSError as err:
            raise ValueError(f"{where}: {text} is not a readable image ({err})") from None
    try:
        raw = base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image.convert("RGB")
    except (binascii.Error, ValueError, OSError):
        raise ValueError(f"{where}: {text[:60]!r} is neither an existing file nor base64-encoded PNG/JPEG "
                         "bytes") from None


class SkyEyeGPTModel(mlflow.pyfunc.PythonModel):
    """SkyEyeGPT as a pyfunc: artifacts `model` (alignment layer, adapter, tokenizer,
    config) and, when they were local folders, `vision` / `llm` (the backbones); backbones
    given by hub id stay references and load by id where the model is served.

    Input: a DataFrame with string columns `image` (base64 PNG/JPEG, or a file path on the
    serving machine: for local batch use; an endpoint open to others should take base64
    only) and `prompt` (task identifier and instruction); output: one answer string per row."""

    def load_context(self, context) -> None:
        import torch

        from ..model.skyeyegpt import META_FILE, build_model
        folder = Path(context.artifacts["model"])
        meta = json.loads((folder / META_FILE).read_text())
        refs = meta["paths"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = build_model(ModelConfig.model_validate(meta["config"]),
                                 context.artifacts.get("vision", refs["vision"]),
                                 context.artifacts.get("llm", refs["llm"]), str(folder / "tokenizer"),
                                 device=device, adapter=folder).eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("image", "prompt") if c not in df.columns]
        if missing:
            raise ValueError(f"model input: missing column(s) {', '.join(missing)}; expected 'image' (base64 "
                             f"PNG/JPEG or a file path) and 'prompt', got {list(df.columns)}")
        params = params or {}
        max_new = int(params.get("max_new_tokens") or self.model.cfg.max_new_tokens)
        batch_size = max(1, int(params.get("batch_size") or 8))
        images, prompts = [], []
        for row, (image, prompt) in enumerate(zip(df["image"], df["prompt"], strict=True)):  # all, before compute
            images.append(decode_image(image, row))
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"row {row}, column 'prompt': empty; expected e.g. {EXAMPLE_PROMPT!r}")
            prompts.append(prompt.strip())
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            answers += self.model.ask(prompts[chunk], pixel_values=self.model.preprocess(images[chunk]),
                                      max_new_tokens=max_new)
        return answers


def model_signature(model_config: dict):
    """What the pyfunc takes and returns; `max_new_tokens` defaults to the model config's."""
    max_new_tokens = ModelConfig.model_validate(model_config).max_new_tokens
    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt")]),
                          outputs=Schema([ColSpec("string", "answer")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens),
                                              ParamSpec("batch_size", "long", 8)]))


def input_example(image: str | Path | None = None):
    """One request: a real image (shrunk to at most 128 px) when given, else a drawn 64x64 PNG."""
    from PIL import Image, ImageDraw
    if image is not None:
        if not Path(image).is_file():
            raise PackagingError(f"example image {image}: no such file")
        im = Image.open(image).convert("RGB")
        im.thumbnail((128, 128))
    else:  # a grey apron with a white airplane-ish cross at the top left
        im = Image.new("RGB", (64, 64), (110, 110, 105))
        draw = ImageDraw.Draw(im)
        draw.rectangle((8, 14, 26, 18), fill=(240, 240, 240))
        draw.rectangle((15, 6, 19, 26), fill=(240, 240, 240))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()], "prompt": [EXAMPLE_PROMPT]})


def requirements() -> list[str]:
    """Pinned to what runs here; explicit, so logging does not load the model to infer them."""
    out = []
    for pkg in ("mlflow", "torch", "transformers", "peft", "tokenizers", "pillow", "numpy", "pandas", "pydantic",
                "pydantic-settings", "pyyaml"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out


def stage_artifacts(model_dir: Path, out: Path, copy_backbones: bool) -> tuple[dict[str, str], dict[str, str], dict]:
    """The trained parts only (not optimizer state), plus backbone folders or hub references;
    returns (artifacts, where each backbone comes from, the saved model's meta)."""
    from ..model.skyeyegpt import ADAPTER_DIR, ALIGNMENT_FILE, META_FILE
    if not (model_dir / META_FILE).exists():
        raise PackagingError(f"{model_dir}: not a saved SkyEyeGPT (no {META_FILE})")
    folder = out / "model"
    folder.mkdir(parents=True)
    for part in (ALIGNMENT_FILE, META_FILE, ADAPTER_DIR, "tokenizer"):
        src = model_dir / part
        if not src.exists():
            raise PackagingError(f"{model_dir}: missing {part}")
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, folder / part)
    artifacts, origin = {"model": str(folder)}, {}
    meta = json.loads((model_dir / META_FILE).read_text())
    for part in ("vision", "llm"):
        ref = meta["paths"][part]
        if Path(ref).exists():  # a folder (or a weights file, as eva_vit_g.pth)
            if copy_backbones:
                artifacts[part] = ref
            origin[part] = ("artifact:" if copy_backbones else "folder:") + str(Path(ref).resolve())
        elif Path(ref).is_absolute() or ref.startswith("."):
            raise PackagingError(f"{model_dir}: {part} backbone {ref} not found")
        else:
            origin[part] = f"hub:{ref}"  # loaded by id where the model is served
    return artifacts, origin, meta
