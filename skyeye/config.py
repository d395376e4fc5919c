"""Defaults in one typed place, and the environment the platform sets for itself.

Every path and service address has an embedded default (one machine: SQLite MLflow
under `mlruns/`, Prefect's ephemeral server with state under `.skyeye/`, a local Ray,
a local DVC remote). Environment variables with the `SKYEYE_` prefix, or the
services' own variables (`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`, `RAY_ADDRESS`,
`AWS_ENDPOINT_URL`), point the same code at servers; `skyeye doctor` shows which is in use.
"""
from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values several packages share, each defined here once (the lowest module they all import)
DEFAULT_MODEL_FILE = "configs/model/tiny.yaml"  # the model config commands and flows use when given none
STAGE_FILE = "configs/train/stage{stage}.yaml"  # each tuning stage's config when none is named
ABLATION_FILE = "configs/ablation.yaml"  # the ablation's config when none is named
WORKERS_PER_STAGE = 2  # Ray Train workers per tuning stage: one per core of the 2-core machines we run on
ScaleName = Literal["tiny", "demo", "full"]  # SkyEye-Synth's scales; skyeye/synth/corpus.py sizes each
SCALE_NAMES: tuple[str, ...] = get_args(ScaleName)
LOCAL_HOST = "127.0.0.1"  # where `skyeye server up` listens by default: loopback only
PREFECT_PORT = 4200  # the Prefect server and its UI (Prefect's own default)
MLFLOW_PORT = 5000  # the MLflow UI (MLflow's own default)
REGISTERED_MODEL = "skyeyegpt"  # the model's name in the MLflow registry (SKYEYE_REGISTERED_MODEL overrides)


def _find_project_root() -> Path:
    """The nearest folder at or above the working directory that holds a `.dvc/` or `pyproject.toml` of ours."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / "data.dvc").exists():
            return folder
    return here


class Settings(BaseSettings):
    """Platform-wide settings. Fields say why they exist; env vars override (SKYEYE_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="SKYEYE_", extra="ignore")

    project_root: Path = Field(default_factory=_find_project_root,
                               description="Repository root: holds data.dvc, .dvc/, mlruns/.")
    data_dir: Path | None = Field(None, description="DVC-tracked data folder; default <root>/data.")
    state_dir: Path | None = Field(
        None, description="Local state (Prefect home, GX context, caches); default <root>/.skyeye.")
    dvc_remote_url: str | None = Field(
        None, description="Any DVC remote URL (s3://..., /mnt/share/...). Unset: the committed local remote.")
    ray_storage: str | None = Field(
        None, description="Where Ray Train keeps checkpoints. Unset: <state>/ray_results, fine on one machine; "
                          "a cluster needs storage every node reaches (s3://bucket/path, an NFS mount).")
    mlflow_tracking_uri: str | None = Field(
        None, description="Unset: MLFLOW_TRACKING_URI, else SQLite under <root>/mlruns/.")
    mlflow_ui_url: str = Field(f"http://{LOCAL_HOST}:{MLFLOW_PORT}", description="Where links to runs point when the "
                               "tracking store is not a server (`skyeye server up` starts the UI there).")
    registered_model: str = Field(REGISTERED_MODEL, description="Name of SkyEyeGPT in the MLflow model registry.")
    inference_log: str | None = Field(
        None, description="Where `skyeye serve` logs every request (Parquet, by day): a folder or s3://bucket/prefix. "
                          "Unset: <state>/inference_log.")
    promotion_policy: Path = Field(Path("configs/promotion.yaml"),
                                   description="Promotion policy file (relative to the project root).")

    @property
    def data(self) -> Path:
        return (self.data_dir or self.project_root / "data").resolve()

    @property
    def synth_dir(self) -> Path:
        return self.data / "synth"

    @property
    def instructions_dir(self) -> Path:
        return self.data / "instructions"

    @property
    def state(self) -> Path:
        return (self.state_dir or self.project_root / ".skyeye").resolve()

    @property
    def inference_log_store(self) -> str:
        return self.inference_log or str(self.state / "inference_log")

    @property
    def checkpoint_storage(self) -> str:
        """Where Ray Train keeps checkpoints: SKYEYE_RAY_STORAGE, else a folder under the state."""
        return self.ray_storage or str(self.state / "ray_results")

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.project_root / 'mlruns' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return str(self.project_root / "mlruns" / "artifacts")


BoxFormat = Literal["auto", "grid100", "unit", "grid1000", "pixels"]  # skyeye/data/llava.py: BOX_FORMATS
SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")  # a source's name becomes part of sample ids


class SourceConfig(BaseModel):
    """One training source of `skyeye data build`: a benchmark folder in its published layout (it
    replaces the synthetic one of the same name) or an instruction set in the LLaVA format (a
    `.json` file, with the folder its `image` paths are relative to)."""

    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="A benchmark folder, or a LLaVA JSON file (name ends in .json).")
    images: Path | None = Field(None, description="LLaVA only: the folder its rows' `image` paths are relative to.")
    box_format: BoxFormat = Field("auto", description="LLaVA only: how its boxes are written: grid100 (0-100, "
                                  "SkyEyeGPT's), unit (0-1 fractions), grid1000 (0-1000), pixels; auto infers "
                                  "by the rule in docs/data.md.")
    licence: str | None = Field(None, description="The source's licence or terms, as its release states them "
                                "(e.g. 'CC BY-NC 4.0', 'research use only'). Unset: what SkyEye records for "
                                "the benchmark (skyeye/formats/licences.py), 'unknown' for a LLaVA set.")

    @property
    def is_llava(self) -> bool:
        return self.path.suffix.lower() == ".json"

    @model_validator(mode="after")
    def _fits_its_kind(self) -> SourceConfig:
        if self.is_llava and self.images is None:
            raise ValueError(f"images: a LLaVA source ({self.path}) needs the folder its image paths are "
                             f"relative to")
        if not self.is_llava and (self.images is not None or self.box_format != "auto"):
            raise ValueError(f"images, box_format: only for a LLaVA source (a .json file); {self.path} is a "
                             f"benchmark folder")
        if self.licence is not None and not self.licence.strip():
            raise ValueError("licence: empty (leave it out for the recorded default)")
        return self


def as_source(value: Path | str | SourceConfig) -> SourceConfig:
    """The plain-path form (`name: /datasets/RSVQA-HR`) as a SourceConfig."""
    return value if isinstance(value, SourceConfig) else SourceConfig(path=Path(value))


class LeakageConfig(BaseModel):
    """Test images found among the training images (docs/data.md, "Leakage across sources")."""

    model_config = ConfigDict(extra="forbid")
    near_duplicate_bits: int = Field(
        6, ge=0, le=31,  # every planted JPEG-q70 + 50-200% resized copy was <= 6 bits off (docs/data.md)
        description="pHash bits at most this far apart count as the same image (measured: docs/data.md).")
    action: Literal["drop", "fail"] = Field(
        "drop", description="drop: the builder removes the training samples that use a test image and reports "
                            "each pair; fail: it keeps them and the data gate fails naming each pair.")


class DataConfig(BaseModel):
    """The data steps of the retrain flow (configs/data.yaml)."""

    model_config = ConfigDict(extra="forbid")
    scale: str = Field("demo", description=f"SkyEye-Synth scale: {' | '.join(SCALE_NAMES)}.")
    seed: int = Field(0, description="Same seed and scale give byte-identical data.")
    sources: dict[str, Path | SourceConfig] = Field(
        default_factory=dict, description="Name -> a benchmark folder (replaces the synthetic one) or a "
                                          "SourceConfig (a LLaVA set; a licence).")
    commit_data: bool = Field(False, description="git-commit data.dvc when the data changed.")
    leakage: LeakageConfig = Field(default_factory=LeakageConfig,
                                   description="Test images among the training images: threshold and action.")

    @field_validator("sources")
    @classmethod
    def _source_names(cls, v: dict) -> dict:
        bad = [k for k in v if not SOURCE_NAME.match(k)]
        if bad:
            raise ValueError(f"source name(s) {bad}: lower-case letters, digits, _ and - (a letter first)")
        return v

    def source_configs(self) -> dict[str, SourceConfig]:
        return {k: as_source(v) for k, v in self.sources.items()}

    @field_validator("scale")
    @classmethod
    def _known_scale(cls, v: str) -> str:
        if v not in SCALE_NAMES:
            raise ValueError(f"unknown scale {v!r}: choose {', '.join(SCALE_NAMES[:-1])} or {SCALE_NAMES[-1]}")
        return v


def load_yaml_config(path: Path, model: type[BaseModel]) -> BaseModel:
    """Load a YAML config into its typed model; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return model.model_validate(raw)
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    except ValidationError as err:  # one line: each field at fault and why
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}".removeprefix(": ") for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None
    except Exception as err:
        raise ValueError(f"{path}: {err}") from None


@lru_cache
def get_settings() -> Settings:
    return Settings()


def configure_environment(settings: Settings | None = None) -> Settings:
    """Set what the services need before they are imported: no analytics (offline
    machines log errors and once locked Prefect's database), state under the project.
    Values already set by the user win."""
    s = settings or get_settings()
    s.state.mkdir(parents=True, exist_ok=True)
    defaults = {
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(s.state / "prefect"),
        # a first start on a fresh, busy 2-core machine (database migrations) can pass Prefect's 20 s
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "GIT_PYTHON_REFRESH": "quiet",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # our own progress bars say more
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1" if not os.environ.get("SKYEYE_HUB_ONLINE") else "0",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return s


def git_revision(root: Path | None = None) -> str | None:
    """HEAD's commit, or None outside a git checkout."""
    root = root or get_settings().project_root
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None
