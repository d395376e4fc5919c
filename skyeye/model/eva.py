"""MiniGPT-v2's vision encoder: LAVIS / BLIP-2's EVA ViT-g/14 (`eva_vit_g.pth`) at 448 px,
run by transformers' `Blip2VisionModel` (the same block: pre-norm attention with a packed
qkv, q and v biases and no k bias, exact GELU, no layer scale, no relative positions).

What MiniGPT-v2 computes (`minigpt4/models/eva_vit.py`, `base_model.init_vision_encoder`):
- `create_eva_vit_g` keeps 39 blocks and no final norm (EVA-CLIP's 40th block and its norm
  are not used by BLIP-2), LayerNorm eps 1e-6, 1408 // 88 = 16 heads;
- the 16 x 16 position embedding of the 224 px checkpoint is interpolated bicubically
  (align_corners False, in float32) to the 32 x 32 grid of 448 px, the CLS position kept;
- `ln_vision` is a LayerNorm(1408) created fresh (weight 1, bias 0, eps 1e-5) and frozen:
  MiniGPT-v2's checkpoints hold no `ln_vision` (only trained tensors are saved). Here it is
  `Blip2VisionModel.post_layernorm`, set to exactly that.

The weights file is read with `torch.load(weights_only=True)`: tensors only, never code.
"""
from __future__ import annotations

# imports inside functions: transformers loads only when a tower is built
import re
from pathlib import Path

import torch

DEPTH = 39            # blocks BLIP-2 keeps (EVA-CLIP ViT-g has 40)
HEAD_DIM = 88         # LAVIS: num_heads = 1408 // 88
BLOCK_EPS = 1e-6      # the blocks' LayerNorms
LN_VISION_EPS = 1e-5  # MiniGPT-v2's ln_vision: torch's default

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# EVA block tensor -> Blip2EncoderLayer tensor (q_bias / v_bias are packed into qkv.bias below)
_BLOCK_KEYS = {
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight", "attn.proj.bias": "self_attn.projection.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
_IGNORED = re.compile(r"^(norm|fc_norm|head)\.")  # EVA-CLIP's final norm / head: BLIP-2 drops them


class EvaWeightsError(ValueError):
    """An EVA weights file that does not hold the tower the config asks for (names the key)."""


def read_eva_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EvaWeightsError(f"vision.name_or_path {path}: no such file (the LAVIS eva_vit_g.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read lazily: 2 GB
    except Exception as err:  # an unpickler refusal or a truncated file
        raise EvaWeightsError(f"{path}: not a tensors-only torch file ({type(err).__name__}: {err})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvaWeightsError(f"{path}: expected a state dict of tensors (LAVIS eva_vit_g.pth)")
    return state


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D) as LAVIS `interpolate_pos_embed` does."""
    pos = pos_embed.float()
    old = int((pos.shape[1] - 1) ** 0.5)
    if old == grid:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def eva_config(state: dict[str, torch.Tensor], image_size: int, depth: int = DEPTH):
    """The Blip2VisionConfig of the tower in `state` at `image_size` px, keeping `depth` blocks."""
    from transformers import Blip2VisionConfig
    for key in _TOP_KEYS + ("blocks.0.mlp.fc1.weight",):
        if key not in state:
            raise EvaWeightsError(f"EVA weights: missing {key!r}")
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    if width % HEAD_DIM:
        raise EvaWeightsError(f"EVA weights: width {width} is not a multiple of the head size {HEAD_DIM}")
    blocks = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    if blocks < depth:
        raise EvaWeightsError(f"EVA weights: {blocks} blocks, the config keeps {depth} (vision.depth)")
    if image_size % patch:
        raise EvaWeightsError(f"vision.image_size {image_size} is not a multiple of the patch size {patch}")
    return Blip2VisionConfig(hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                             num_hidden_layers=depth, num_attention_heads=width // HEAD_DIM,
                             image_size=image_size, patch_size=patch, qkv_bias=True, layer_norm_eps=BLOCK_EPS,
                             hidden_act="gelu")


def eva_to_blip2(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """LAVIS EVA tensor names -> Blip2VisionModel's, position embedding interpolated, ln_vision
    added. Every tensor the tower needs must be there; blocks past `depth` and EVA-CLIP's final
    norm are left out (as BLIP-2 leaves them); anything else unknown is refused."""
    grid = config.image_size // config.patch_size
    out = {"embeddings.class_embedding": state["cls_token"],
           "embeddings.position_embedding": interpolate_pos_embed(state["pos_embed"], grid),
           "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
           "post_layernorm.weight": torch.ones(config.hidden_size),
           "post_layernorm.bias": torch.zeros(config.hidden_size)}
    for key, value in state.items():
        if key in _TOP_KEYS or _IGNORED.match(key):
            continue
        m = _BLOCK.match(key)
        if m is None:
            raise EvaWeightsError(f"EVA weights: unexpected tensor {key!r} {tuple(value.shape)}")
        layer, name = int(m.group(1)), m.group(2)
        if layer >= config.num_hidden_layers:
            continue
        if name in ("attn.q_bias", "attn.v_bias"):
            continue
        if name not in _BLOCK_KEYS:
            raise EvaWeightsError(f"EVA weights: unexpected tensor {key!r} {tuple(value.shape)}")
        out[f"encoder.layers.{layer}.{_BLOCK_KEYS[name]}"] = value
    for layer in range(config.num_hidden_layers):
        q, v = state.get(f"blocks.{layer}.attn.q_bias"), state.get(f"blocks.{layer}.attn.v_bias")
        if q is None or v is None:
            raise EvaWeightsError(f"EVA weights: missing 'blocks.{layer}.attn.{'q' if q is None else 'v'}_bias'")
        out[f"encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])  # no k bias
    return out


def build_eva_tower(path: str | Path, image_size: int, depth: int = DEPTH, dtype: torch.dtype = torch.float32):
    """A frozen-ready Blip2VisionModel holding the EVA weights of `path`, with ln_vision as its
    final norm; a missing tensor or a shape that differs is refused, naming the key and shapes."""
    from transformers import Blip2VisionModel
    state = read_eva_state(path)
    config = eva_config(state, image_size, depth)
    tower = Blip2VisionModel(config)
    tower.post_layernorm.eps = LN_VISION_EPS
    converted = eva_to_blip2(state, config)
    expected = tower.state_dict()
    for key, value in expected.items():
        if key not in converted:
            raise EvaWeightsError(f"{path}: no tensor for {key!r} of the tower")
        if converted[key].shape != value.shape:
            raise EvaWeightsError(f"{path}: {key!r} is {tuple(converted[key].shape)}, the tower needs "
                                  f"{tuple(value.shape)}")
    tower.load_state_dict({k: converted[k] for k in expected}, strict=True)
    return tower.to(dtype)
