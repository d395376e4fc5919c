"""The drift monitor's settings (configs/monitor.yaml): the window, the samples and the
thresholds. Defaults live here only; the YAML file says why each value."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..config import get_settings, load_yaml_config


class Thresholds(BaseModel):
    """A signal beyond its threshold means drift: PSIs and shares above, the p-value below."""
    model_config = ConfigDict(extra="forbid")
    task_mix_psi: float = Field(0.2, gt=0)
    prompt_length_psi: float = Field(0.2, gt=0)
    image_size_psi: float = Field(0.2, gt=0)
    image_content_p: float = Field(0.01, gt=0, lt=1)
    unparsable_box_share: float = Field(0.2, ge=0, le=1)
    length_cut_share: float = Field(0.2, ge=0, le=1)


class MonitorConfig(BaseModel):
    """configs/monitor.yaml."""
    model_config = ConfigDict(extra="forbid")
    window_hours: float = Field(24, gt=0, description="The window of the inference log compared, ending now.")
    min_rows: int = Field(200, ge=1, description="Fewer requests in the window: not enough traffic, no verdict.")
    cron: str | None = Field("0 4 * * *", description="When `skyeye schedule up` runs the monitor (UTC).")
    reference_images: int = Field(256, ge=8, description="Training images sampled for encoder signatures.")
    reference_prompts: int = Field(20000, ge=100, description="Training questions sampled for mix and lengths.")
    window_images: int = Field(512, ge=8, description="Window signatures compared at most.")
    permutations: int = Field(500, ge=99, description="Permutations behind the image-content p-value.")
    bins: int = Field(10, ge=2, le=50, description="Reference-quantile bins of the continuous PSIs.")
    seed: int = 0
    thresholds: Thresholds = Thresholds()


def load_monitor_config(path: str | Path | None = None) -> MonitorConfig:
    path = Path(path) if path else get_settings().project_root / "configs" / "monitor.yaml"
    return load_yaml_config(path, MonitorConfig) if path.exists() else MonitorConfig()  # type: ignore[return-value]
