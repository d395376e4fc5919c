"""SkyEyeGPT: frozen vision encoder -> alignment layer -> LLM decoder with LoRA.

The visual tokens of each image (or each sampled video frame, concatenated) replace
the `<ImageHere>` placeholder positions of the prompt embeddings; the decoder then
runs as any causal LM, for training (loss on answers) and for batched generation with
a KV cache (Hugging Face `generate` from `inputs_embeds`).
"""
from __future__ import annotations

# imports inside functions: peft and transformers' model classes load only when a model is built
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .alignment import AlignmentLayer
from .config import ModelConfig
from .template import MINIGPT_V2, Encoded, collate, encode_prompt, slot_id
from .tokenizer import load_tokenizer
from .vision import VisionEncoder, build_vision_encoder

ALIGNMENT_FILE = "alignment_layer.pt"
ADAPTER_DIR = "adapter"
META_FILE = "skyeyegpt.json"


class SkyEyeGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vision: VisionEncoder, alignment: AlignmentLayer, llm: nn.Module, tokenizer,
                 paths: dict[str, str]):
        super().__init__()
        self.cfg, self.vision, self.alignment_layer, self.llm, self.tokenizer = cfg, vision, alignment, llm, tokenizer
        self.paths = paths  # where the backbones came from (hub ids or folders)
        self.image_token_id = slot_id(tokenizer, cfg.template)

    # ------------------------------------------------------------ shapes
    @property
    def device(self) -> torch.device:
        return self.alignment_layer.proj.weight.device

    def visual_tokens_per_image(self) -> int:
        if getattr(self, "_n_visual", None) is None:  # fixed by the config: measured once
            with torch.no_grad():
                dummy = torch.zeros(1, 3, self.cfg.vision.image_size, self.cfg.vision.image_size, device=self.device,
                                    dtype=self.alignment_layer.proj.weight.dtype)
                self._n_visual = self.encode_images(dummy).shape[1]
        return self._n_visual

    # ------------------------------------------------------------ pixels
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Bicubic resize to the encoder's side, CLIP mean/std; no crop, no augmentation."""
        side = self.cfg.vision.image_size
        arr = np.stack([np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
                        for im in images])
        x = (torch.from_numpy(arr) - torch.tensor(self.cfg.vision.mean)) / torch.tensor(self.cfg.vision.std)
        return x.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N/group, H_llm) projected visual tokens."""
        return self.alignment_layer(self.vision(pixel_values))

    def _embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, frames: list[int] | None,
                vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if vision_tokens is not None:  # the frozen encoder's output, computed once (training cache)
            visual = self.alignment_layer(vision_tokens.to(self.device, embeds.dtype))
        else:
            visual = self.encode_images(pixel_values.to(self.device, embeds.dtype)).to(embeds.dtype)
        if frames is not None and any(f > 1 for f in frames):  # a clip's frames follow one another
            visual = torch.cat([v.reshape(-1, v.shape[-1]) for v in torch.split(visual, frames)], 0)
        slots = input_ids == self.image_token_id
        if slots.sum() != visual.shape[0] * (visual.shape[1] if visual.dim() == 3 else 1):
            raise ValueError(f"{int(slots.sum())} image placeholders for {tuple(visual.shape)} visual tokens")
        return embeds.masked_scatter(slots.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))

    # ------------------------------------------------------------ train / generate
    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None, frames=None, vision_tokens=None,
                output_attentions: bool = False, output_hidden_states: bool = False):
        embeds = self._embeds(input_ids.to(self.device), pixel_values, frames, vision_tokens)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device),
                        labels=None if labels is None else labels.to(self.device), output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, frames=None, max_new_tokens: int | None = None,
                 vision_tokens=None, temperature: float = 0.0) -> list[str]:
        """Batched (left-padded prompts), KV cache on; greedy, or sampled at `temperature` > 0.
        Returns the decoded answers."""
        embeds = self._embeds(input_ids.to(self.device), pixel_values, frames, vision_tokens)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        if self.cfg.template == MINIGPT_V2:  # MiniGPT-v2's generate passes min_length=1: no empty answer
            sampling["min_new_tokens"] = 1
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device),
                                max_new_tokens=max_new_tokens or self.cfg.max_new_tokens, **sampling,
                                use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                                suppress_tokens=[self.image_token_id],  # an answer never holds an image slot
                                eos_token_id=self.tokenizer.eos_token_id)
        answers = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out]
        if self.cfg.template == MINIGPT_V2:  # as MiniGPT-v2's generate cleans an answer
            answers = [a.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1] for a in answers]
        return [a.strip() for a in answers]

    def ask(self, questions: list[str], frames: list[int] | None = None, pixel_values=None, vision_tokens=None,
            histories: list[list[tuple[str, str]]] | None = None, max_new_tokens: int | None = None,
            temperature: float = 0.0) -> list[str]:
        """One question per image (or clip of `frames` frames), after its conversation so far:
        the chat template, left-padded prompts, batched generation. Every caller asks this way."""
        frames = frames or [1] * len(questions)
        histories = histories or [[] for _ in questions]
        n = self.visual_tokens_per_image()
        batch = collate([Encoded(encode_prompt(self.tokenizer, h, q, n * f, self.cfg.template), [])
                         for q, f, h in zip(questions, frames, histories, strict=True)],
                        self.tokenizer.pad_token_id, left_pad=True)
        return self.generate(batch["input_ids"], batch["attention_mask"], pixel_values, frames=frames,
                             max_new_tokens=max_new_tokens, vision_tokens=vision_tokens, temperature=temperature)

    def prompt_length(self, question: str, history: list[tuple[str, str]], frames: int = 1) -> int:
        """Tokens of the prompt `ask` builds for this question (visual slots included)."""
        return len(encode_prompt(self.tokenizer, history, question, self.visual_tokens_per_image() * frames,
                                 self.cfg.template))

    def context_length(self) -> int:
        """Positions the LLM takes: prompt and answer together must fit."""
        return int(getattr(self.llm.config, "max_position_embeddings", 2048))

    # ------------------------------------------------------------ trainable parts
    def trainable_parameters(self) -> dict[str, int]:
        counts = {"vision_encoder": 0, "alignment_layer": 0, "lora": 0, "llm_base": 0}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("vision."):
                counts["vision_encoder"] += p.numel()
            elif name.startswith("alignment_layer."):
                counts["alignment_layer"] += p.numel()
            elif "lora_" in name or "modules_to_save" in name:
                counts["lora"] += p.numel()
            else:
                counts["llm_base"] += p.numel()
        return counts

    # ------------------------------------------------------------ save / load
    def save(self, out: Path) -> Path:
        """Alignment layer, LoRA adapter, tokenizer and config: what the stages train, plus
        references to the (unchanged) backbones."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.alignment_layer.state_dict(), out / ALIGNMENT_FILE)
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(out / ADAPTER_DIR)
        self.tokenizer.save_pretrained(out / "tokenizer")
        (out / META_FILE).write_text(json.dumps({"config": self.cfg.model_dump(mode="json"), "paths": self.paths},
                                                indent=1))
        return out


def apply_trainable(model: SkyEyeGPT) -> SkyEyeGPT:
    """Set requires_grad from `cfg.trainable`: the one place that decides what trains."""
    t = model.cfg.trainable
    model.vision.tower.requires_grad_(t.vision_encoder)
    if not t.vision_encoder:
        model.vision.freeze()
    model.alignment_layer.requires_grad_(t.alignment_layer)
    for name, p in model.llm.named_parameters():
        is_lora = "lora_" in name or "modules_to_save" in name
        p.requires_grad_(t.lora if is_lora else t.llm_base)
    return model


def build_model(cfg: ModelConfig, vision_path: str | None = None, llm_path: str | None = None,
                tokenizer_path: str | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", adapter: str | Path | None = None) -> SkyEyeGPT:
    """Backbones through the real loaders (hub id or folder), a fresh or saved alignment
    layer, LoRA from the config or a saved adapter; refuses a config that cannot work."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    vision_path = vision_path or cfg.vision.name_or_path
    llm_path = llm_path or cfg.llm.name_or_path
    if not vision_path or not llm_path:
        raise ValueError("model config: vision.name_or_path and llm.name_or_path must name backbones "
                         "(the tiny config gets them from the backbones step)")
    try:
        tokenizer = load_tokenizer(tokenizer_path or cfg.llm.tokenizer or llm_path, cfg.template)
    except OSError as err:
        raise ValueError(f"llm.tokenizer {tokenizer_path or llm_path!r}: cannot load: {err}") from None
    try:
        vision = build_vision_encoder(cfg.vision, vision_path, dtype)
    except OSError as err:
        raise ValueError(f"vision.name_or_path {vision_path!r}: cannot load: {err}") from None
    try:
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    except OSError as err:
        raise ValueError(f"llm.name_or_path {llm_path!r}: cannot load: {err}") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in llm.named_modules()}
    missing = [m for m in cfg.lora.target_modules + cfg.lora.modules_to_save if m not in names]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} not in the LLM {llm_path} "
                         f"(it has e.g. {sorted(n for n in names if n.endswith('proj'))[:8]})")
    alignment = AlignmentLayer(vision.width, llm.config.hidden_size, cfg.alignment.group).to(dtype)
    if adapter is not None:
        adapter = Path(adapter)
        llm = PeftModel.from_pretrained(llm, str(adapter / ADAPTER_DIR), is_trainable=True)
        alignment.load_state_dict(torch.load(adapter / ALIGNMENT_FILE, map_location="cpu"))
    elif cfg.trainable.lora:
        llm = get_peft_model(llm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=cfg.lora.target_modules,
                                             modules_to_save=cfg.lora.modules_to_save or None, task_type="CAUSAL_LM"))
    model = SkyEyeGPT(cfg, vision, alignment, llm, tokenizer,
                      {"vision": str(vision_path), "llm": str(llm_path), "tokenizer": str(tokenizer_path or llm_path)})
    return apply_trainable(model).to(device)



def untuned_like(model: SkyEyeGPT) -> SkyEyeGPT:
    """The same architecture before tuning: its backbones, a fresh alignment layer and adapter
    (the evaluation's `untuned` baseline)."""
    torch.manual_seed(0)  # a fixed 'before' model, so reruns give the same baseline
    return build_model(model.cfg, model.paths["vision"], model.paths["llm"], model.paths["tokenizer"]).eval()

def backbone_paths(folder: str | Path) -> dict[str, str]:
    """Where a saved SkyEyeGPT's backbones are (its `SkyEyeGPT.save` record)."""
    meta_path = Path(folder) / META_FILE
    if not meta_path.exists():
        raise ValueError(f"{folder}: not a saved SkyEyeGPT (no {META_FILE})")
    return dict(json.loads(meta_path.read_text())["paths"])


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SkyEyeGPT:
    """A saved SkyEyeGPT (see `SkyEyeGPT.save`): backbones by reference, trained parts from the folder."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder}: not a saved SkyEyeGPT (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    cfg = ModelConfig.model_validate(meta["config"])
    return build_model(cfg, meta["paths"]["vision"], meta["paths"]["llm"], str(folder / "tokenizer"), dtype, device,
                       adapter=folder)
