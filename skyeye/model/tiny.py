"""Tiny backbones built from scratch (no download possible here): a Hugging Face ViT
vision tower and a LLaMA-architecture causal LM, saved as ordinary HF checkpoints so
the model builder loads them exactly as it would load a hub checkpoint."""
from __future__ import annotations

# imports inside functions: transformers loads only when backbones are built (model.config reads this module's config)
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TinyVisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int | None = Field(
        None, description="Input side; None: the model's vision.image_size (ModelConfig fills it in), so a "
                          "model config states its side once.")
    patch_size: int = 16
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4


class TinyLLMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 688
    max_positions: int = 512
    tie_embeddings: bool = False  # untied output embeddings learned faster in early trials on this CPU


class BackbonesConfig(BaseModel):
    """What the backbones step pretrains, and for how long: `*_steps` optimizer steps when set
    (the same backbones whatever the machine's load), the `*_seconds` budgets then only a
    safety net; unset (None), the wall-clock budgets alone.

    The defaults are the recipe the shipped `configs/model/tiny.yaml` pretrains with (it sets
    none of them): `backbones: {}` in a model config means these backbones."""
    model_config = ConfigDict(extra="forbid")
    vision: TinyVisionSpec = TinyVisionSpec()
    llm: TinyLLMSpec = TinyLLMSpec()
    vocab_size: int = 2000
    # budgets in steps, so every run pretrains the same backbones whatever the machine's load
    # (what 180 s / 90 s gave on 2 idle cores); the seconds are only a safety net, far beyond that
    vision_seconds: float = 3600.0
    vision_steps: int | None = 620
    vision_batch: int = 32  # more, smaller steps: box L1 error 0.036 -> 0.025 in the same 180 s
    vision_lr: float = 2e-3
    # frames per step whose scene / event class the encoder also learns (CapERA's ERA event
    # per clip frame, RSICD's scene class in the file name); 0 turns it off. From captions
    # alone the LLM did not learn clip events. Weight 0.3, not 1: the box read-out of object
    # patches suffers less (docs/experiments/2026-11-29-capera-direction-of-motion.md)
    scene_batch: int = 8
    scene_weight: float = 0.3  # of the scene loss, against the dense losses' weight of 1
    # caption images per step whose object counts (read from their train captions) the
    # encoder also learns, summed over its patches; 0 turns it off. Without it, captions
    # named each scene's usual count, not the image's
    count_batch: int = 8
    count_weight: float = 0.3
    llm_seconds: float = 1800.0
    llm_steps: int | None = 70
    llm_batch: int = 64
    llm_lr: float = 2e-3
    seed: int = 0


def new_vision_tower(spec: TinyVisionSpec):
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.hidden_size,
                    num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                    intermediate_size=spec.hidden_size * 4)
    return ViTModel(cfg, add_pooling_layer=False)


def new_llm(spec: TinyLLMSpec, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                      max_position_embeddings=spec.max_positions, tie_word_embeddings=spec.tie_embeddings,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return LlamaForCausalLM(cfg)


def save_random_backbones(out: Path, tokenizer, vision: TinyVisionSpec, llm: TinyLLMSpec) -> dict[str, str]:
    """Untrained backbones of the given sizes (tests, and the starting point of pretraining)."""
    out = Path(out)
    tower = new_vision_tower(vision)
    tower.save_pretrained(out / "vision")
    lm = new_llm(llm, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    lm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return {"vision": str(out / "vision"), "llm": str(out / "llm")}
