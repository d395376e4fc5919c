"""SkyEyeGPT's configuration, typed: backbones, alignment layer, LoRA, and which parts
train in each stage (declared here, in one place, and checked by a test).

`configs/model/paper.yaml` is the paper's setup; `configs/model/tiny.yaml` the CPU default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import load_yaml_config
from ..formats.prompts import VIDEO_FRAMES
from .tiny import BackbonesConfig

VISION_KINDS = ("hf", "timm", "eva_vit_g")
PROJECTORS = ("alignment_layer",)
# CLIP's normalisation: the vision default, and what the tiny encoder is pretrained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hf", "timm", "eva_vit_g"] = Field(
        "hf", description="hf: any HF vision tower (CLIP, SigLIP, ViT); timm: e.g. EVA-CLIP; eva_vit_g: the "
                          "LAVIS/BLIP-2 EVA ViT-g weights file MiniGPT-v2 reads (eva_vit_g.pth), see eva.py.")
    name_or_path: str | None = Field(
        None, description="Hub id or local folder; None: the backbones step's tiny encoder.")
    image_size: int = Field(448, description="Input side in pixels (bicubic resize, no crop).")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    drop_cls: bool = Field(True, description="Drop the CLS token: only patch tokens go to the LLM.")
    depth: int = Field(39, description="eva_vit_g only: blocks kept (BLIP-2 and MiniGPT-v2 keep 39 of EVA's 40).")
    video_frames: int = Field(VIDEO_FRAMES, description="Frames sampled from a clip; their visual tokens are "
                                                        "concatenated (the instruction files' clips: VIDEO_FRAMES).")


class AlignmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    projector: str = Field("alignment_layer", description="Only the paper's: group tokens, one linear layer.")
    group: int = Field(4, description="Consecutive visual tokens concatenated before the linear layer (paper: 4).")

    @field_validator("projector")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PROJECTORS:
            raise ValueError(f"unknown projector {v!r}; known: {', '.join(PROJECTORS)}")
        return v


class LLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name_or_path: str | None = Field(None, description="Hub id or local folder of a causal LM; None: the tiny LLM.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; None: the LLM's own.")


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "v_proj"]
    # Extra modules trained in full next to LoRA (peft's modules_to_save), e.g. the
    # embeddings of tokens the tiny tokenizer added. Empty in the paper.
    modules_to_save: list[str] = []


class TrainableConfig(BaseModel):
    """Which parts train. The paper: alignment layer and LoRA in both stages; the vision
    encoder and the LLM's own weights stay frozen."""
    model_config = ConfigDict(extra="forbid")
    vision_encoder: bool = False
    alignment_layer: bool = True
    lora: bool = True
    llm_base: bool = False


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "skyeyegpt"
    vision: VisionConfig = VisionConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    llm: LLMConfig = LLMConfig()
    lora: LoRAConfig = LoRAConfig()
    trainable: TrainableConfig = TrainableConfig()
    template: Literal["skyeyegpt", "minigpt_v2"] = Field(
        "skyeyegpt", description="skyeyegpt: the tiny tokenizer's marker and coordinate tokens; minigpt_v2: "
                                 "MiniGPT-v2's text with LLaMA-2's own tokenizer (model/template.py).")
    max_new_tokens: int = Field(48, description="Generation budget per answer.")
    backbones: BackbonesConfig | None = Field(None, description="Tiny backbones to pretrain here; None: real ones.")

    @model_validator(mode="after")
    def _group_positive(self) -> "ModelConfig":
        if self.alignment.group < 1:
            raise ValueError("alignment.group must be >= 1")
        return self

    @model_validator(mode="after")
    def _one_image_size(self) -> "ModelConfig":
        """The tiny encoder is pretrained at the side the model reads: backbones.vision.image_size
        is vision.image_size (filled in when unset), and a config where the two differ is refused."""
        if self.backbones is None:
            return self
        side, tower = self.vision.image_size, self.backbones.vision
        if tower.image_size is None:
            self.backbones = self.backbones.model_copy(
                update={"vision": tower.model_copy(update={"image_size": side})})
        elif tower.image_size != side:
            raise ValueError(f"backbones.vision.image_size ({tower.image_size}) differs from vision.image_size "
                             f"({side}): the tiny encoder is pretrained at the side the model reads; set it once, "
                             "as vision.image_size")
        return self


def load_model_config(path: str | Path) -> ModelConfig:
    return load_yaml_config(Path(path), ModelConfig)  # type: ignore[return-value]
