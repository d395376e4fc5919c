"""MiniGPT-v2's checkpoint format, both ways: the authors' SkyEyeGPT release (and any
MiniGPT-v2 fine-tune) in, a SkyEye-tuned model out.

A MiniGPT-v2 checkpoint is `torch.save({"model": state, ...})` where `state` holds only the
tensors that trained (LAVIS's runner drops the frozen ones; buffers stay):
- `llama_proj.weight` (H, 4 * D_vision), `llama_proj.bias` (H): the alignment layer;
- `llama_model.base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight`:
  LoRA (peft 0.2's names, no adapter name), loaded there with `strict=False`;
- `...layers.{i}.self_attn.rotary_emb.inv_freq`: a buffer that transformers 4.30 saved,
  recomputed from the config by every LLaMA, so read and left out.
SkyEye keeps the same tensors as `alignment_layer.pt` (`proj.*`) and a peft adapter folder.
Reading is tensors-only (`weights_only=True`); a missing or unexpected key, or a shape that
does not match the config, is refused naming the key and both shapes.
"""
from __future__ import annotations

# imports inside functions: safetensors and peft load only when a checkpoint is converted
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig

PROJ = "llama_proj"
LORA_PREFIX = "llama_model.base_model.model."  # MiniGPT-v2's LoRA-wrapped LLaMA
ADAPTER_PREFIX = "base_model.model."            # peft's saved adapter keys
_LORA = re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight")
_INV_FREQ = re.compile(r"llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model config; nothing is written or registered."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The `model` state of a MiniGPT-v2 checkpoint, tensors only (a pickle that would run code
    is refused by torch's restricted unpickler, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a tensors-only MiniGPT-v2 checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]})") from None
    state = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'model' state dict (MiniGPT-v2 saves {{'model': ..., ...}})")
    return state


def llm_shape(llm_dir: str | Path) -> tuple[int, int]:
    """(hidden size, layers) from the LLM folder's config.json, without loading weights."""
    cfg_file = Path(llm_dir) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"--llm {llm_dir}: no config.json (a LLaMA-2 chat folder in Hugging Face format)")
    cfg = json.loads(cfg_file.read_text())
    return int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])


def expected_shapes(cfg: ModelConfig, vision_width: int, hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for this config holds, in MiniGPT-v2's names, with its shape."""
    r = cfg.lora.r
    out = {f"{PROJ}.weight": (hidden, vision_width * cfg.alignment.group), f"{PROJ}.bias": (hidden,)}
    for i in range(layers):
        for module in cfg.lora.target_modules:  # LLaMA's q/k/v/o projections are H x H
            stem = f"{LORA_PREFIX}model.layers.{i}.self_attn.{module}"
            out[f"{stem}.lora_A.weight"] = (r, hidden)
            out[f"{stem}.lora_B.weight"] = (hidden, r)
    return out


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing {key!r} (the config needs {shape})")
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: {key!r} is {tuple(state[key].shape)}, the config needs {shape}")
    for key, value in state.items():
        if key not in expected and not _INV_FREQ.fullmatch(key):
            raise CheckpointError(f"{source}: unexpected {key!r} {tuple(value.shape)} (not a part SkyEyeGPT trains "
                                  "under this config: check lora.target_modules and the LLM)")


def vision_width(cfg: ModelConfig, vision_path: str | Path) -> int:
    if cfg.vision.kind == "eva_vit_g":
        from .eva import read_eva_state
        return int(read_eva_state(vision_path)["cls_token"].shape[-1])
    from .vision import build_vision_encoder
    return build_vision_encoder(cfg.vision, str(vision_path)).width


def _write_atomically(out: Path, fill) -> Path:
    """Fill a temporary folder beside `out`, then rename it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_checkpoint(checkpoint: str | Path, vision: str | Path, llm: str | Path, cfg: ModelConfig,
                      out: str | Path) -> dict:
    """Write a SkyEyeGPT model folder (`SkyEyeGPT.save`'s layout) from a MiniGPT-v2 checkpoint;
    returns where it came from (file name, size, sha256). Refused before anything is written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from .skyeyegpt import ADAPTER_DIR, ALIGNMENT_FILE, META_FILE
    checkpoint = Path(checkpoint)
    state = read_checkpoint(checkpoint)
    hidden, layers = llm_shape(llm)
    check_state(state, expected_shapes(cfg, vision_width(cfg, vision), hidden, layers), str(checkpoint))
    adapter = {ADAPTER_PREFIX + k[len(LORA_PREFIX):]: v.contiguous() for k, v in state.items()
               if k.startswith(LORA_PREFIX) and "lora_" in k}
    tokenizer_files = [Path(llm) / f for f in TOKENIZER_FILES if (Path(llm) / f).is_file()]
    if not tokenizer_files:
        raise CheckpointError(f"--llm {llm}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")

    def fill(tmp: Path) -> None:
        torch.save({"proj.weight": state[f"{PROJ}.weight"], "proj.bias": state[f"{PROJ}.bias"]}, tmp / ALIGNMENT_FILE)
        (tmp / ADAPTER_DIR).mkdir()
        LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                   target_modules=cfg.lora.target_modules, bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=str(llm)).save_pretrained(str(tmp / ADAPTER_DIR))
        save_file(adapter, str(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS))
        (tmp / "tokenizer").mkdir()
        for f in tokenizer_files:
            shutil.copy2(f, tmp / "tokenizer" / f.name)
        (tmp / META_FILE).write_text(json.dumps(
            {"config": cfg.model_dump(mode="json"),
             "paths": {"vision": str(Path(vision).resolve()), "llm": str(Path(llm).resolve()),
                       "tokenizer": str(Path(llm).resolve())}}, indent=1))

    _write_atomically(Path(out), fill)
    return {"file": checkpoint.name, "bytes": checkpoint.stat().st_size, "sha256": sha256(checkpoint)}


def export_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """A saved SkyEyeGPT's trained tensors under MiniGPT-v2's names."""
    from safetensors.torch import load_file

    from .skyeyegpt import ADAPTER_DIR, ALIGNMENT_FILE
    model_dir = Path(model_dir)
    align = torch.load(model_dir / ALIGNMENT_FILE, map_location="cpu", weights_only=True)
    state = {f"{PROJ}.weight": align["proj.weight"], f"{PROJ}.bias": align["proj.bias"]}
    weights = model_dir / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{model_dir}: no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
    for key, value in load_file(str(weights)).items():
        if not (key.startswith(ADAPTER_PREFIX) and _LORA.fullmatch(key[len(ADAPTER_PREFIX):])):
            raise CheckpointError(f"{model_dir}: adapter tensor {key!r} has no place in a MiniGPT-v2 checkpoint "
                                  "(only LoRA on the attention projections)")
        state[LORA_PREFIX + key[len(ADAPTER_PREFIX):]] = value
    return state


def export_checkpoint(model_dir: str | Path, out: str | Path) -> Path:
    """Write `{"model": state}` as MiniGPT-v2's `load_state_dict(ckpt["model"], strict=False)` reads it."""
    state = export_state(model_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"model": state}, tmp)
    os.replace(tmp, out)
    return out
