"""SkyEyeGPT with dim-64 backbones: forward/backward/generate, trainable parameters per
stage, the template and its masking, save/load, the shipped configs, bad configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from skyeye.model.config import LoRAConfig, ModelConfig, VisionConfig, load_model_config
from skyeye.model.skyeyegpt import build_model, load_model
from skyeye.model.template import IGNORE, Encoded, collate, encode_conversation, encode_prompt
from skyeye.model.tiny import TinyLLMSpec, TinyVisionSpec, new_llm, new_vision_tower
from skyeye.model.tokenizer import IMAGE_TOKEN

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vision=VisionConfig(image_size=64), lora=LoRAConfig(r=8, alpha=16))


@pytest.fixture(scope="module")
def backbones(tiny_backbones):
    return tiny_backbones


def _model(backbones, cfg=CFG, **kw):
    return build_model(cfg, backbones["vision"], backbones["llm"], backbones["tokenizer"], **kw)


def _batch(model):
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    encs = [encode_conversation(tok, [("[refer] the red ship", "{<1><2><30><40>}")], n),
            encode_conversation(tok, [("[vqa] how many ships are there?", "2"),
                                      ("[caption] describe", "a harbour.")], n)]
    px = model.preprocess([Image.new("RGB", (80, 80), (200, 40, 40)), Image.new("RGB", (80, 80), (40, 40, 200))])
    return collate(encs, tok.pad_token_id), px


def test_forward_backward_generate(backbones):
    model = _model(backbones)
    batch, px = _batch(model)
    out = model(batch["input_ids"], batch["attention_mask"], px, batch["labels"])
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.alignment_layer.proj.weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())  # frozen encoder gets no gradient
    tok, n = model.tokenizer, model.visual_tokens_per_image()
    prompts = collate([Encoded(encode_prompt(tok, [], q, n), []) for q in ("[refer] the ship", "[vqa] is it?")],
                      tok.pad_token_id, left_pad=True)
    answers = model.generate(prompts["input_ids"], prompts["attention_mask"], px, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_trainable_parameters_per_stage(backbones, tmp_path):
    stage1 = _model(backbones)
    counts = stage1.trainable_parameters()
    vision_w, llm_w, r, layers = 64, 64, 8, 2
    assert counts["alignment_layer"] == (4 * vision_w + 1) * llm_w
    assert counts["lora"] == layers * 2 * r * (llm_w + llm_w)  # q_proj and v_proj: A (r x in) + B (out x r)
    assert counts["vision_encoder"] == 0 and counts["llm_base"] == 0
    stage1.save(tmp_path / "stage1")
    stage2 = build_model(CFG, backbones["vision"], backbones["llm"], backbones["tokenizer"],
                         adapter=tmp_path / "stage1")
    assert stage2.trainable_parameters() == counts  # stage 2 trains the same parts, from stage 1's values


def test_template_masks_prompts_and_expands_the_image(backbones):
    tok = _model(backbones).tokenizer
    enc = encode_conversation(tok, [("[vqa] how many ships?", "2"), ("[refer] the red ship", "{<1><2><3><4>}")], 5)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert enc.input_ids.count(image_id) == 5  # one placeholder per visual token, first turn only
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE]
    assert tok.decode(supervised) == "2</s>{<1><2><3><4>}</s>"  # answers and their end token only
    text = tok.decode(enc.input_ids)
    assert text.count("[INST]") == 2 and text.startswith("<s>[INST] <Img>")


def test_save_load_round_trip_gives_identical_outputs(backbones, tmp_path):
    model = _model(backbones)
    with torch.no_grad():  # move the adapter away from its zero init so the test means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    batch, px = _batch(model)
    before = model(batch["input_ids"], batch["attention_mask"], px).logits
    model.save(tmp_path / "saved")
    again = load_model(tmp_path / "saved").eval()
    after = again(batch["input_ids"], batch["attention_mask"], px).logits
    assert torch.equal(before, after)


def test_shipped_configs_resolve_and_paper_builds_with_stand_ins(backbones, tmp_path):
    tiny = load_model_config(REPO / "configs/model/tiny.yaml")
    assert tiny.backbones is not None and tiny.alignment.group == 4
    paper = load_model_config(REPO / "configs/model/paper.yaml")
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout, paper.lora.target_modules) == (64, 16, 0.05,
                                                                                                ["q_proj", "v_proj"])
    assert paper.vision.image_size == 448 and paper.llm.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    # Stand-ins of the same families: a patch-14 ViT at 448 px (EVA-CLIP ViT-g/14 shape: 32 x 32 patches)
    # and a LLaMA-architecture LM. timm is not installable next to the CPU torch here, so the tower
    # goes through the HF loader; the paper's LoRA settings apply unchanged.
    from skyeye.model.tokenizer import load_tokenizer
    tok = load_tokenizer(backbones["tokenizer"])
    new_vision_tower(TinyVisionSpec(image_size=448, patch_size=14, hidden_size=32, layers=1, heads=2)).save_pretrained(
        tmp_path / "eva-standin")
    llm = new_llm(TinyLLMSpec(hidden_size=64, layers=1, heads=2, intermediate_size=128), len(tok), tok.bos_token_id,
                  tok.eos_token_id, tok.pad_token_id)
    llm.save_pretrained(tmp_path / "llama-standin")
    cfg = paper.model_copy(update={"vision": paper.vision.model_copy(update={"kind": "hf"})})
    model = build_model(cfg, str(tmp_path / "eva-standin"), str(tmp_path / "llama-standin"), backbones["tokenizer"])
    assert model.visual_tokens_per_image() == 256  # 1024 patch tokens grouped by 4
    assert model.trainable_parameters()["lora"] == 2 * 64 * (64 + 64)


def test_bad_configs_are_refused_before_compute(backbones, tmp_path):
    with pytest.raises(ValueError, match="projector"):
        ModelConfig.model_validate({"alignment": {"projector": "qformer"}})
    with pytest.raises(ValueError, match="lora.target_modules.*c_attn"):
        _model(backbones, CFG.model_copy(update={"lora": LoRAConfig(target_modules=["c_attn"])}))
    with pytest.raises(ValueError, match="vision.kind|kind"):
        ModelConfig.model_validate({"vision": {"kind": "onnx"}})
    with pytest.raises(ValueError, match="vision.name_or_path.*nowhere"):
        build_model(CFG, str(tmp_path / "nowhere"), backbones["llm"], backbones["tokenizer"])


def test_a_tiny_model_overfits_one_fixed_batch(backbones):
    """The whole trainable path (alignment layer, LoRA on every linear layer, lm_head, the
    template's answer-only loss) can fit one fixed batch: answer-token loss from ~6 to below
    0.1 in 40 AdamW steps (measured: 0.003), after which greedy decoding repeats each answer."""
    from tests.support import FITTABLE, overfit
    torch.manual_seed(0)
    model = _model(backbones, FITTABLE)
    convs = [("[refer] the red ship", "{<10><20><30><40>}"), ("[vqa] how many ships are there?", "2"),
             ("[caption] describe the image", "a harbour with two ships."),
             ("[refer] the blue car", "{<60><5><90><25>}")]
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 40, 40), (40, 40, 200), (40, 200, 40), (200, 200, 40))]
    losses = overfit(model, convs, images)
    assert losses[0] > 4 and losses[-1] < 0.1, losses[::10]
    model.eval()
    answers = model.ask([q for q, _ in convs], pixel_values=model.preprocess(images), max_new_tokens=24)
    assert answers == [a for _, a in convs]


def test_the_tiny_encoders_side_is_the_models_and_a_second_one_is_refused(tmp_path):
    """tiny.yaml states the input side once (vision.image_size); the backbones step pretrains the
    encoder at that side, and a config that gives the encoder another is refused, named."""
    tiny = load_model_config(REPO / "configs/model/tiny.yaml")
    assert tiny.backbones.vision.image_size == tiny.vision.image_size == 128
    bad = tmp_path / "model.yaml"
    bad.write_text("vision: {image_size: 128}\nbackbones: {vision: {image_size: 64}}\n")
    with pytest.raises(ValueError, match=r"model\.yaml.*backbones\.vision\.image_size \(64\) differs from "
                                         r"vision\.image_size \(128\)"):
        load_model_config(bad)
    agreed = ModelConfig.model_validate({"vision": {"image_size": 64}, "backbones": {"vision": {"image_size": 64}}})
    assert agreed.backbones.vision.image_size == 64
    assert ModelConfig.model_validate(agreed.model_dump()) == agreed  # a saved config loads again


def test_the_shipped_tiny_backbones_are_the_typed_defaults():
    """BackbonesConfig's defaults are the recipe tiny.yaml ships (it sets none of them), so
    `backbones: {}` and a BackbonesConfig() built in code pretrain the same backbones."""
    from skyeye.model.tiny import BackbonesConfig
    tiny = load_model_config(REPO / "configs/model/tiny.yaml")
    side = {"vision": {"image_size"}}
    assert tiny.backbones.model_dump(exclude=side) == BackbonesConfig().model_dump(exclude=side)
