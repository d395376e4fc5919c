"""Scaled-down weights in exactly the released layouts the authors' SkyEyeGPT needs, built
here because the real ones cannot be downloaded: LAVIS's `eva_vit_g.pth` (its key names,
q/v biases, a 224-px-style position grid to interpolate, one block more than BLIP-2 keeps),
a LLaMA-2 chat folder (Hugging Face config and weights, a sentencepiece-style tokenizer:
BPE with byte fallback, `▁` for spaces, `<unk>` `<s>` `</s>` = 0 1 2) and a MiniGPT-v2
checkpoint (`{"model": ...}` with `llama_proj.*`, peft-0.2 LoRA names and the rotary
`inv_freq` buffers transformers 4.30 saved, plus optimizer state and config)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

WIDTH, MLP, PATCH = 176, 768, 14      # 2 heads of 88, as ViT-g's 16 heads of 88
EVA_BLOCKS, DEPTH = 3, 2              # the file holds one block more than the tower keeps
PRETRAIN_GRID, IMAGE_SIZE = 4, 112    # 4 x 4 positions in the file, 8 x 8 patches at 112 px
HIDDEN, LAYERS, HEADS, R, ALPHA = 64, 2, 4, 8, 16
TEXT = ("[INST] <Img></Img> [refer] give me the location of the white airplane [/INST] {<12><30><45><61>} "
        "[vqa] how many ships are in the harbour? there are 3 ships. [caption] an airport with two runways "
        "and several planes parked near the terminal. [grounding] a storage tank, a bridge over the river.")


def eva_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale
    state = {"cls_token": rand(1, 1, WIDTH), "pos_embed": rand(1, 1 + PRETRAIN_GRID ** 2, WIDTH),
             "patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": rand(WIDTH)}
    for i in range(EVA_BLOCKS):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": 1 + rand(WIDTH), b + "norm1.bias": rand(WIDTH),
                  b + "attn.q_bias": rand(WIDTH), b + "attn.v_bias": rand(WIDTH),
                  b + "attn.qkv.weight": rand(3 * WIDTH, WIDTH), b + "attn.proj.weight": rand(WIDTH, WIDTH),
                  b + "attn.proj.bias": rand(WIDTH), b + "norm2.weight": 1 + rand(WIDTH), b + "norm2.bias": rand(WIDTH),
                  b + "mlp.fc1.weight": rand(MLP, WIDTH), b + "mlp.fc1.bias": rand(MLP),
                  b + "mlp.fc2.weight": rand(WIDTH, MLP), b + "mlp.fc2.bias": rand(WIDTH)}
    return state


def write_eva(path: Path) -> Path:
    torch.save(eva_state(), path)
    return path


def write_tokenizer(folder: Path) -> None:
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    # sentencepiece learns pieces within words: split at "▁" while learning the merges
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    learner.train_from_iterator([TEXT] * 4, trainer=trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    # LLaMA's layout: <unk> <s> </s>, the 256 byte-fallback pieces (ordinary tokens), the pieces
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = learner.normalizer  # as LLaMA's tokenizer.json: no pre-tokenizer when encoding
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def write_llama(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def checkpoint_state(seed: int = 1, modules=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(HIDDEN, 4 * WIDTH, generator=g) / math.sqrt(4 * WIDTH),
             "llama_proj.bias": torch.randn(HIDDEN, generator=g) * 0.1}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS)))
    for i in range(LAYERS):
        stem = f"llama_model.base_model.model.model.layers.{i}.self_attn."
        for m in modules:
            state[stem + f"{m}.lora_A.weight"] = torch.randn(R, HIDDEN, generator=g) * 0.2
            state[stem + f"{m}.lora_B.weight"] = torch.randn(HIDDEN, R, generator=g) * 0.2  # trained: not zero
        state[stem + "rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def write_checkpoint(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """As LAVIS's runner saves it: the model state with the optimizer's, the config and the epoch."""
    state = checkpoint_state() if state is None else state
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                "config": {"model": {"arch": "minigpt_v2", "lora_r": R, "lora_alpha": ALPHA}}, "scaler": None,
                "epoch": 4}, path)
    return path


def released(root: Path) -> dict[str, Path]:
    """The three files a user downloads, scaled down: EVA weights, LLaMA-2 folder, checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    return {"vision": write_eva(root / "eva_vit_g.pth"), "llm": write_llama(root / "Llama-2-7b-chat-hf"),
            "checkpoint": write_checkpoint(root / "skyeyegpt.pth")}


def model_config():
    """configs/model/minigpt_v2.yaml's structure at these sizes."""
    from skyeye.model.config import load_model_config
    cfg = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/minigpt_v2.yaml")
    return cfg.model_copy(update={
        "vision": cfg.vision.model_copy(update={"image_size": IMAGE_SIZE, "depth": DEPTH}),
        "lora": cfg.lora.model_copy(update={"r": R, "alpha": ALPHA}), "max_new_tokens": 12})
