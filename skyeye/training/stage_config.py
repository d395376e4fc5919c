"""A tuning stage as a config file (configs/train/stage1.yaml, stage2.yaml): schedule,
batch, accumulation, per-source sampling ratios, max length, precision, the validation
samples scored as it trains (never a test split: a config that names one is refused)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import load_yaml_config
from ..formats.benchmarks import VALIDATION_DIR, sealed


def _not_sealed(field: str, value: str | None) -> str | None:
    """A training-time file must not be a test split: those are read by the evaluation alone."""
    if value and sealed(value):
        raise ValueError(f"{field}: {value} is a test split, sealed until the evaluation; training reads "
                         f"{VALIDATION_DIR}/<bench>_val.json for its curves (docs/data.md, 'Validation splits')")
    return value


class ValidationConfig(BaseModel):
    """Validation samples scored during training (per-task learning curves); never a test split."""
    model_config = ConfigDict(extra="forbid")
    grounding: str | None = f"{VALIDATION_DIR}/dior_rsvg_val.json"
    vqa: str | None = f"{VALIDATION_DIR}/rsvqa_lr_val.json"
    caption: str | None = f"{VALIDATION_DIR}/ucm_captions_val.json"
    conversation: str | None = None  # grounding validation file whose images become 3-turn conversations
    samples: int = Field(64, description="Per task, per evaluation.")
    every_steps: int = Field(200, description="Score every this many steps; a multiple of the stage's log_every.")

    @model_validator(mode="after")
    def _sealed(self) -> "ValidationConfig":
        for task in ("grounding", "vqa", "caption", "conversation"):
            _not_sealed(f"validation.{task}", getattr(self, task))
        return self


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal[1, 2]
    data: str = Field(description="Instruction file, relative to the instruction folder (stage1.json / stage2.json).")
    max_steps: int = 1000
    time_budget_s: float | None = Field(None, description="Stop early (and cleanly) after this much training time.")
    anneal_by: Literal["steps", "time"] = Field("steps", description="What the cosine decay follows. steps: "
                                                "`max_steps` alone, so reruns train alike whatever the machine's "
                                                "load (the time budget only stops); time: also ends with "
                                                "`time_budget_s` when that comes first (a wall-clock run that "
                                                "still anneals, at the price of reproducibility).")
    batch_size: int = Field(32, description="Global batch (split over workers), before accumulation.")
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    alignment_lr_scale: float = Field(1.0, description="lr multiplier for the alignment layer.")
    grad_clip: float = 1.0
    length_groups: int = Field(1, ge=1, description="Run each batch as this many forward/backward passes over "
                               "length-sorted groups: the same gradient, less padding (a 4-frame clip "
                               "otherwise pads a whole batch to its length).")
    max_length: int = 192
    precision: Literal["fp32", "bf16"] = "fp32"
    sampling: dict[str, float] = Field(default_factory=dict, description="source -> ratio; empty: by size.")
    replay: str | None = Field(None, description="A second instruction file mixed into every batch (stage 2: "
                                                 "stage1.json), so stage-1 skills are not forgotten.")
    replay_share: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each batch drawn from `replay`.")
    replay_sampling: dict[str, float] = Field(default_factory=dict, description="source -> ratio within `replay`.")
    coordinate_sigma: float = Field(0.0, ge=0.0, description="Soft targets for coordinate tokens, a Gaussian "
                                    "this many grid units wide (training/loop.py; 0 = the paper's cross-entropy).")
    pointing_weight: float = Field(0.0, ge=0.0, description="Weight of the grounding attention loss "
                                   "(training/pointing.py; a tiny-model aid, 0 = the paper's recipe).")
    pointing_motion: bool = Field(False, description="Also point clips' answers at their moving visual tokens "
                                  "(training/pointing.py; needs pointing_weight > 0).")
    pointing_layers: list[int] = Field(default_factory=lambda: [1], description="Decoder layers (0-based) whose "
                                       "attention the pointing loss guides.")
    cache_features: bool = Field(True, description="Encode each image once with the frozen encoder.")
    log_every: int = Field(10, ge=1, description="Report (MLflow metrics) every this many steps.")
    checkpoint_every: int = Field(200, description="Checkpoint every this many steps; a multiple of log_every.")
    seed: int = 0
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        _not_sealed("data", self.data)
        _not_sealed("replay", self.replay)
        if self.replay_share > 0 and not self.replay:
            raise ValueError("replay_share > 0 needs `replay` (an instruction file, e.g. stage1.json)")
        # The loop writes checkpoints and scores the validation samples only at report steps
        # (every `log_every`): any other cadence would silently skip some of them.
        for name, every in (("checkpoint_every", self.checkpoint_every), ("validation.every_steps",
                                                                          self.validation.every_steps)):
            if every < 1 or every % self.log_every:
                raise ValueError(f"{name} ({every}) must be a positive multiple of log_every ({self.log_every}): "
                                 f"the loop checkpoints and scores only at report steps, so it would skip some")
        return self


def load_stage_config(path: str | Path) -> StageConfig:
    return load_yaml_config(Path(path), StageConfig)  # type: ignore[return-value]
