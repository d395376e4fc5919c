"""The frozen vision encoder: any Hugging Face vision tower (CLIP, SigLIP, ViT) or a timm
model such as EVA-CLIP, by hub id or local folder, returning patch tokens (B, N, D).

Frozen in one place: `requires_grad_(False)`, eval mode, forward under `no_grad`.
"""
from __future__ import annotations

# imports inside functions: transformers and timm load only when an encoder is built
import torch
from torch import nn

from .config import VisionConfig


class VisionEncoder(nn.Module):
    def __init__(self, tower: nn.Module, kind: str, width: int, drop_cls: bool, n_prefix: int):
        super().__init__()
        self.tower, self.kind, self.width = tower, kind, width
        self.drop_cls, self.n_prefix = drop_cls, n_prefix

    def freeze(self) -> "VisionEncoder":
        self.tower.requires_grad_(False)
        self.tower.eval()
        return self

    def train(self, mode: bool = True) -> "VisionEncoder":  # stays in eval mode while frozen
        frozen = not any(p.requires_grad for p in self.tower.parameters())
        return super().train(False if frozen else mode)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) patch tokens."""
        frozen = not any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(not frozen and torch.is_grad_enabled()):
            if self.kind == "timm":
                tokens = self.tower.forward_features(pixel_values)  # (B, prefix + N, D)
            else:
                tokens = self.tower(pixel_values=pixel_values).last_hidden_state
        return tokens[:, self.n_prefix:] if self.drop_cls else tokens


def build_vision_encoder(cfg: VisionConfig, path: str, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """Load the tower named by `path` (hub id or local folder); fails loudly on an unknown kind."""
    if cfg.kind == "hf":
        from transformers import AutoConfig, AutoModel
        hf_cfg = AutoConfig.from_pretrained(path)
        # CLIP/SigLIP checkpoints hold text and vision; take the vision tower alone.
        model_type = getattr(hf_cfg, "model_type", "")
        if model_type in ("clip", "siglip"):
            from transformers import CLIPVisionModel, SiglipVisionModel
            cls = CLIPVisionModel if model_type == "clip" else SiglipVisionModel
            tower = cls.from_pretrained(path, dtype=dtype)
        else:
            tower = AutoModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False) \
                if model_type == "vit" else AutoModel.from_pretrained(path, dtype=dtype)
        vcfg = getattr(tower.config, "vision_config", tower.config)
        # SigLIP has no CLS token; CLIP and ViT put one first.
        n_prefix = 0 if "siglip" in tower.config.model_type else 1
        return VisionEncoder(tower, "hf", vcfg.hidden_size, cfg.drop_cls, n_prefix)
    if cfg.kind == "eva_vit_g":
        from .eva import build_eva_tower
        tower = build_eva_tower(path, cfg.image_size, cfg.depth, dtype)
        return VisionEncoder(tower, "hf", tower.config.hidden_size, cfg.drop_cls, 1)
    if cfg.kind == "timm":
        try:
            import timm
        except ImportError as err:  # timm pulls torchvision, so it is an optional extra
            raise ImportError("vision.kind 'timm' needs timm: pip install 'skyeye[timm]'") from err
        tower = timm.create_model(path, pretrained=True, num_classes=0, img_size=cfg.image_size).to(dtype)
        return VisionEncoder(tower, "timm", tower.num_features, cfg.drop_cls, getattr(tower, "num_prefix_tokens", 1))
    raise ValueError(f"vision.kind {cfg.kind!r} unknown; known: hf, timm, eva_vit_g")
