"""References to a SkyEyeGPT, resolved one way for every command that takes a model
(`chat`, `evaluate`, `train --init`, the bench scripts):

- a model folder (what a tuning stage writes), taken as it is;
- the MLflow run id of a tuning stage, whose `skyeye.model_dir` tag names its folder;
- a registry URI, `models:/skyeyegpt@production` or `models:/skyeyegpt/3`, loaded from
  the registered pyfunc (its artifacts carry the backbones).

Version references of the registry itself (`3`, `v3`, `production`, or a URI) resolve
to a version number here too, and the audit parses URIs with the same function. All of
it through the configured tracking store (`skyeye.tracking.runs.client`), never MLflow's
default in the working directory.
"""
from __future__ import annotations

# imports inside functions: the model (torch, transformers) loads only when a reference is loaded, not resolved
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..config import get_settings
from ..tracking import runs
from ..tracking.names import TAG_MODEL_DIR, TAG_TRAINING_RUN, TUNING_EXPERIMENT

URI_PREFIX = "models:/"
KNOWN_ALIASES = ("staging", "production")


class RegistryError(ValueError):
    """An unknown version/alias/run/model, or a request the registry must refuse."""


def model_name() -> str:
    """The registered model's name: SKYEYE_REGISTERED_MODEL read now (settings are cached)."""
    return os.environ.get("SKYEYE_REGISTERED_MODEL") or get_settings().registered_model


def production_uri() -> str:
    return f"{URI_PREFIX}{model_name()}@production"


def parse_model_uri(ref: str | int, default_name: str) -> tuple[str, str | None, str | None]:
    """-> (model name, version or None, alias or None) of `models:/name@alias`,
    `models:/name/3`, `3`, `v3` or an alias; RegistryError naming a malformed URI."""
    text = str(ref).strip()
    if text.startswith(URI_PREFIX):
        body = text.removeprefix(URI_PREFIX)
        name, sep, target = body.partition("@") if "@" in body else body.partition("/")
        if not name or not sep or not target or (sep == "/" and not target.isdigit()):
            raise RegistryError(f"model URI {text!r}: expected {URI_PREFIX}{default_name}@<alias> or "
                                f"{URI_PREFIX}{default_name}/<version>")
        return (name, target, None) if sep == "/" else (name, None, target)
    if re.fullmatch(r"[vV]?\d+", text):
        return default_name, text.lstrip("vV"), None
    if not text:
        raise RegistryError("empty model reference: give a version number or an alias")
    return default_name, None, text


def aliases(client: MlflowClient, name: str) -> dict[str, int]:
    """Alias -> version of the registered model; RegistryError when nothing is registered."""
    try:
        return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        raise RegistryError(f"no model registered as {name!r} yet (register an evaluated model first)") from None


def production_version() -> int | None:
    """The version the production alias points at; None before anything is registered or promoted."""
    try:
        return aliases(runs.client(), model_name()).get("production")
    except RegistryError:
        return None


def version_exists(client: MlflowClient, name: str, version: int) -> int:
    try:
        client.get_model_version(name, str(version))
        return version
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"version {version} of {name} not found (versions: "
                            f"{', '.join(map(str, known)) or 'none'})") from None


def resolve_version(ref: str | int) -> int:
    """'3', 'v3', 3, 'staging', 'production', 'models:/skyeyegpt@production' or
    'models:/skyeyegpt/3' -> the version number; errors name the reference."""
    client, name = runs.client(), model_name()
    uri_name, version, alias = parse_model_uri(ref, name)
    if uri_name != name:
        raise RegistryError(f"model URI {str(ref).strip()!r} names {uri_name!r}, not the registered model {name!r}")
    if version is not None:
        return version_exists(client, name, int(version))
    held = aliases(client, name)
    if alias in held:
        return held[alias]
    listed = ", ".join(f"{a} -> {v}" for a, v in sorted(held.items())) or "none set"
    if alias in KNOWN_ALIASES:
        raise RegistryError(f"alias {alias!r} of {name} is not set (aliases: {listed})")
    raise RegistryError(f"unknown model reference {ref!r}: not a version (N, vN) nor an alias of {name} "
                        f"(aliases: {listed})")


def training_run_of(folder: str | Path) -> str | None:
    """The tuning-stage run that wrote a model folder (the inverse of a run id's folder)."""
    client = runs.client()
    exp = client.get_experiment_by_name(TUNING_EXPERIMENT)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_MODEL_DIR}` = '{folder}'",
                               max_results=1) if exp else []
    return found[0].info.run_id if found else None


def model_folder(ref: str) -> str:
    """A local SkyEyeGPT folder for `ref`: a folder as it is; a tuning-stage run id -> the
    folder that run wrote; a registry URI -> the folder its version was registered from,
    when that folder is on this machine."""
    text = str(ref).strip()
    if Path(text).exists():
        return text
    client = runs.client()
    if text.startswith(URI_PREFIX):
        version = resolve_version(text)
        folder = client.get_model_version(model_name(), str(version)).tags.get(TAG_MODEL_DIR)
        if not folder or not Path(folder).exists():
            raise RegistryError(f"{text} (version {version}) was registered from {folder or 'an unrecorded folder'}, "
                                "which is not on this machine; give a model folder or a tuning-stage run id")
        return folder
    try:
        run = client.get_run(text)
    except MlflowException:
        raise RegistryError(f"{text!r} is neither a model folder, an MLflow run id nor a {URI_PREFIX} URI") from None
    folder = run.data.tags.get(TAG_MODEL_DIR)
    if not folder:
        raise RegistryError(f"run {text} has no {TAG_MODEL_DIR} tag: not a tuning-stage run")
    return folder


@dataclass
class LoadedModel:
    model: Any  # a SkyEyeGPT in eval mode
    source: str  # the folder it was loaded from, or the registry URI
    training_run: str  # the tuning-stage run that wrote it, "" when unknown
    version: int | None = None  # the registered version, for a registry URI


def load(ref: str) -> LoadedModel:
    """The SkyEyeGPT `ref` names, ready to answer; any failure becomes one RegistryError
    naming the reference."""
    text = str(ref).strip()
    try:
        if text.startswith(URI_PREFIX):  # the registered pyfunc, unwrapped to the SkyEyeGPT inside
            version = resolve_version(text)
            name = model_name()
            mv = runs.client().get_model_version(name, str(version))
            model = mlflow.pyfunc.load_model(f"{URI_PREFIX}{name}/{version}").unwrap_python_model().model
            return LoadedModel(model.eval(), text, mv.tags.get(TAG_TRAINING_RUN, ""), version)
        from .skyeyegpt import load_model
        folder = model_folder(text)
        run = text if folder != text else (training_run_of(folder) or "")
        return LoadedModel(load_model(folder).eval(), folder, run)
    except Exception as err:  # noqa: BLE001 - any loader failure is reported the same way
        raise RegistryError(f"{text}: does not load: {err}") from None
