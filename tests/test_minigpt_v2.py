"""The authors' SkyEyeGPT in SkyEye, proven on scaled-down weights in the released layouts
(tests/released.py): SkyEye's logits and greedy answers equal those of an independent
MiniGPT-v2 forward written here from its code's behaviour (not SkyEye's modules); import
refuses broken checkpoints and writes nothing; export gives back every tensor bit for bit."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from skyeye.model.minigpt_v2 import CheckpointError, export_checkpoint, import_checkpoint, sha256
from skyeye.model.skyeyegpt import load_model
from tests.released import DEPTH, IMAGE_SIZE, PATCH, checkpoint_state, model_config, released, write_checkpoint

QUESTIONS = ["[refer] give me the location of the white airplane", "[vqa] how many ships are in the harbour?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return released(tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "model"
    import_checkpoint(files["checkpoint"], files["vision"], files["llm"], model_config(), out)
    return out


# ------------------------------------------------------------------ MiniGPT-v2, written out
def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8))


def blip2_image_eval(im: Image.Image) -> torch.Tensor:
    """Resize((448, 448), BICUBIC) on the PIL image, ToTensor, Normalize(BLIP's mean/std)."""
    x = torch.tensor(np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)), dtype=torch.float32) / 255
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    return ((x - mean) / std).permute(2, 0, 1)


def eva_vit_g(eva: dict, x: torch.Tensor) -> torch.Tensor:
    """eva_vit.VisionTransformer.forward_features with `DEPTH` blocks, no final norm."""
    pos = eva["pos_embed"].float()
    old, new = int((pos.shape[1] - 1) ** 0.5), IMAGE_SIZE // PATCH
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    pos = torch.cat([pos[:, :1], grid], 1)
    h = F.conv2d(x, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([eva["cls_token"].expand(len(x), -1, -1), h], 1) + pos
    width = h.shape[-1]
    heads = width // 88
    for i in range(DEPTH):
        block = {k[len(f"blocks.{i}."):]: v for k, v in eva.items() if k.startswith(f"blocks.{i}.")}
        p = block.__getitem__
        y = F.layer_norm(h, (width,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), torch.cat([p("attn.q_bias"), torch.zeros(width), p("attn.v_bias")]))
        q, k, v = qkv.reshape(len(x), -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = h + F.linear((attn @ v).transpose(1, 2).reshape(len(x), -1, width), p("attn.proj.weight"),
                         p("attn.proj.bias"))
        y = F.layer_norm(h, (width,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = h + F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
    return h


class MiniGPTv2:
    """encode_img, get_context_emb and generate of minigpt_v2.py / minigpt_base.py, with the
    checkpoint's LoRA merged into the LLaMA weights by hand (W + alpha / r * B A)."""

    def __init__(self, files: dict[str, Path], checkpoint: Path, alpha: float):
        from transformers import AutoTokenizer, LlamaForCausalLM
        self.eva = torch.load(files["vision"], weights_only=True)
        ckpt = torch.load(checkpoint, weights_only=True)["model"]
        self.tok = AutoTokenizer.from_pretrained(files["llm"])
        self.llama = LlamaForCausalLM.from_pretrained(files["llm"]).eval()
        self.proj_w, self.proj_b = ckpt["llama_proj.weight"], ckpt["llama_proj.bias"]
        for key, a in ckpt.items():
            if key.endswith("lora_A.weight"):
                b = ckpt[key.replace("lora_A", "lora_B")]
                module = key[len("llama_model.base_model.model."):-len(".lora_A.weight")]
                weight = self.llama.get_submodule(module).weight
                with torch.no_grad():
                    weight += alpha / a.shape[0] * b @ a

    def encode_img(self, images: torch.Tensor) -> torch.Tensor:
        h = eva_vit_g(self.eva, images)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-5)[:, 1:]  # ln_vision: fresh LayerNorm; drop CLS
        bs, pn, hs = h.shape
        return F.linear(h.reshape(bs, pn // 4, hs * 4), self.proj_w, self.proj_b)

    def context_emb(self, question: str, img: torch.Tensor) -> torch.Tensor:
        prompt = f"<s>[INST] <Img><ImageHere></Img> {question} [/INST]"  # CONV_VISION_minigptv2, prepare_texts
        segs = prompt.split("<ImageHere>")
        ids = [self.tok(s, return_tensors="pt", add_special_tokens=i == 0).input_ids for i, s in enumerate(segs)]
        embed = self.llama.get_input_embeddings()
        return torch.cat([embed(ids[0]), img[None], embed(ids[1])], 1)

    @torch.no_grad()
    def logits(self, im: Image.Image, question: str) -> torch.Tensor:
        emb = self.context_emb(question, self.encode_img(blip2_image_eval(im)[None])[0])
        return self.llama(inputs_embeds=emb).logits[0]

    @torch.no_grad()
    def answer(self, im: Image.Image, question: str, max_new_tokens: int) -> str:
        """Greedy, EOS barred at the first step (generate's min_length=1), cleaned as theirs."""
        emb = self.context_emb(question, self.encode_img(blip2_image_eval(im)[None])[0])
        out: list[int] = []
        for step in range(max_new_tokens):
            scores = self.llama(inputs_embeds=emb).logits[0, -1]
            if step == 0:
                scores[self.tok.eos_token_id] = -float("inf")
            nxt = int(scores.argmax())
            if nxt == self.tok.eos_token_id:
                break
            out.append(nxt)
            emb = torch.cat([emb, self.llama.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        text = self.tok.decode(out, skip_special_tokens=True)
        return text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip()


# ------------------------------------------------------------------ parity
def skyeye_logits(model, im: Image.Image, question: str) -> torch.Tensor:
    from skyeye.model.template import encode_prompt
    ids = torch.tensor([encode_prompt(model.tokenizer, [], question, model.visual_tokens_per_image(),
                                      model.cfg.template)])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), pixel_values=model.preprocess([im]))
    return out.logits[0]


def test_logits_and_greedy_answers_equal_minigpt_v2s(files, imported):
    model = load_model(imported).eval()
    ref = MiniGPTv2(files, files["checkpoint"], alpha=model.cfg.lora.alpha)
    assert model.visual_tokens_per_image() == (IMAGE_SIZE // PATCH) ** 2 // 4
    for seed, question in enumerate(QUESTIONS):
        im = image(seed)
        mine, theirs = skyeye_logits(model, im, question), ref.logits(im, question)
        assert mine.shape == theirs.shape  # same tokens: two BOS, the pieces, 16 visual tokens
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        answer = model.ask([question], pixel_values=model.preprocess([im]), max_new_tokens=12)[0]
        assert answer == ref.answer(im, question, 12)


def test_a_wrong_tower_would_be_caught(files, imported):
    """The parity test has teeth: the same model without ln_vision gives other logits."""
    model = load_model(imported).eval()
    ref = MiniGPTv2(files, files["checkpoint"], alpha=model.cfg.lora.alpha)
    model.vision.tower.post_layernorm.eps = 1e-6  # ln_vision's eps is 1e-5
    model.vision.tower.post_layernorm.weight.data.mul_(1.01)
    im = image(0)
    assert not torch.allclose(skyeye_logits(model, im, QUESTIONS[0]), ref.logits(im, QUESTIONS[0]), atol=1e-4)


def test_export_gives_back_every_tensor_bit_for_bit(files, imported, tmp_path):
    out = export_checkpoint(imported, tmp_path / "exported.pth")
    back = torch.load(out, weights_only=True)["model"]
    original = torch.load(files["checkpoint"], weights_only=True)["model"]
    trained = {k: v for k, v in original.items() if not k.endswith("rotary_emb.inv_freq")}
    assert set(back) == set(trained)
    for key, value in trained.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_exported_checkpoint_runs_in_minigpt_v2(files, imported, tmp_path):
    """A model changed in SkyEye, exported, gives MiniGPT-v2's forward the same logits as SkyEye's."""
    model = load_model(imported).eval()
    with torch.no_grad():
        model.alignment_layer.proj.bias.add_(0.5)  # as if tuned further
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.5)
    model.save(tmp_path / "tuned")
    ref = MiniGPTv2(files, export_checkpoint(tmp_path / "tuned", tmp_path / "tuned.pth"), alpha=model.cfg.lora.alpha)
    im = image(3)
    torch.testing.assert_close(skyeye_logits(model, im, QUESTIONS[1]), ref.logits(im, QUESTIONS[1]),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ refusals
def _refused(files, tmp_path, state: dict, match: str) -> None:
    bad = write_checkpoint(tmp_path / "bad.pth", state)
    out = tmp_path / "model"
    with pytest.raises(CheckpointError, match=match):
        import_checkpoint(bad, files["vision"], files["llm"], model_config(), out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]


def test_import_refuses_a_missing_key(files, tmp_path):
    state = checkpoint_state()
    del state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    _refused(files, tmp_path, state, r"missing 'llama_model\.base_model\.model\.model\.layers\.1\.self_attn\.v_proj"
                                     r"\.lora_B\.weight' \(the config needs \(64, 8\)\)")


def test_import_refuses_an_unexpected_key(files, tmp_path):
    state = checkpoint_state(modules=("q_proj", "k_proj", "v_proj"))
    _refused(files, tmp_path, state, r"unexpected 'llama_model\.base_model\.model\.model\.layers\.0\.self_attn\.k_proj"
                                     r"\.lora_A\.weight' \(8, 64\)")


def test_import_refuses_a_shape_that_does_not_match_the_config(files, tmp_path):
    state = checkpoint_state()
    state["llama_proj.weight"] = state["llama_proj.weight"][:, :-4]
    _refused(files, tmp_path, state, r"'llama_proj\.weight' is \(64, 700\), the config needs \(64, 704\)")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_import_never_runs_a_pickle(files, tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    torch.save({"model": checkpoint_state(), "config": evil}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a tensors-only MiniGPT-v2 checkpoint"):
        import_checkpoint(tmp_path / "evil.pth", files["vision"], files["llm"], model_config(), tmp_path / "model")
    assert not marker.exists() and not (tmp_path / "model").exists()


# ------------------------------------------------------------------ the commands, as a user runs them
@pytest.mark.slow
def test_import_evaluate_promote_audit_export_chat(files, tiny_instructions, tmp_path, monkeypatch):
    """`skyeye import minigpt-v2` registers a version tagged with its file and no data version;
    promotion refuses it until `skyeye evaluate` scores it; then it promotes, the audit says
    where it came from, `skyeye chat` answers as MiniGPT-v2 does and `skyeye export` gives the
    checkpoint's tensors back."""
    from typer.testing import CliRunner

    from flows.cli import app
    from skyeye.tracking import runs
    from skyeye.tracking.names import IMPORTED_DATA, TAG_DVC_MD5, TAG_EVAL_RUN, TAG_IMPORTED, read_licences
    from tests.projects import project_environment, write_project
    root = write_project(tmp_path / "project")
    config = root / "configs/model/minigpt_v2.yaml"
    config.write_text(model_config().model_dump_json())  # JSON is YAML
    cli = CliRunner()
    with project_environment(root, monkeypatch, store=True, chdir=True):
        r = cli.invoke(app, ["import", "minigpt-v2", str(files["checkpoint"]), "--vision", str(files["vision"]),
                             "--llm", str(files["llm"]), "--model", str(config), "--licence", "research use only"])
        assert r.exit_code == 0, r.output
        assert "registered version 1" in r.output
        tags = runs.client().get_model_version("skyeyegpt", "1").tags
        assert read_licences(tags) == {"imported skyeyegpt": "research use only"}
        record = json.loads(tags[TAG_IMPORTED])
        assert record["file"] == "skyeyegpt.pth" and record["sha256"] == sha256(files["checkpoint"])
        assert tags[TAG_DVC_MD5] == IMPORTED_DATA and TAG_EVAL_RUN not in tags

        r = cli.invoke(app, ["promote", "--version", "1", "--to", "staging"])
        assert r.exit_code != 0 and "no skyeye.eval_run" in r.output, r.output
        r = cli.invoke(app, ["evaluate", "--model", "models:/skyeyegpt/1", "--data", str(tiny_instructions),
                             "--no-baselines"])
        assert r.exit_code == 0, r.output
        assert "version 1 had no evaluation" in r.output
        r = cli.invoke(app, ["promote", "--version", "1", "--to", "staging"])
        assert r.exit_code == 0, r.output

        r = cli.invoke(app, ["audit", "--model", "staging"])
        assert r.exit_code == 0, r.output
        assert f"imported: skyeyegpt.pth ({files['checkpoint'].stat().st_size} bytes, sha256 " \
               f"{record['sha256']}), minigpt-v2 checkpoint" in r.output
        assert "imported skyeyegpt: research use only" in r.output

        im = image(5)
        im.save(tmp_path / "scene.png")
        r = cli.invoke(app, ["chat", QUESTIONS[1], "--image", str(tmp_path / "scene.png"), "--model",
                             "models:/skyeyegpt@staging"])
        assert r.exit_code == 0, r.output
        expected = MiniGPTv2(files, files["checkpoint"], alpha=model_config().lora.alpha).answer(
            Image.open(tmp_path / "scene.png"), QUESTIONS[1], model_config().max_new_tokens)
        assert r.output.strip().splitlines()[-1] == expected

        r = cli.invoke(app, ["export", "staging", str(tmp_path / "out.pth")])
        assert r.exit_code == 0, r.output
    back = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    original = torch.load(files["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(back[k], original[k]) for k in back) and len(back) == len(original) - 2  # inv_freq x2


@pytest.mark.slow
def test_stage_2_continues_an_imported_model_and_exports(files, imported, tiny_instructions, tmp_path, monkeypatch):
    """`skyeye train --stage 2 --init <imported>` with configs/model/minigpt_v2.yaml, which names no
    backbones (they come from the imported model): the alignment layer and LoRA move, the result
    exports; the tiny model's aids are refused for a MiniGPT-v2 model."""
    from skyeye.training.jobs import prepare_backbones, train_stage
    from skyeye.training.stage_config import StageConfig
    from tests.projects import project_environment, write_project
    root = write_project(tmp_path / "project")
    stage = StageConfig(stage=2, data="stage2.json", max_steps=3, warmup_steps=1, batch_size=2, lr=1e-3,
                        max_length=256, coordinate_sigma=0.0, pointing_weight=0.0, cache_features=False,
                        log_every=3, checkpoint_every=3, validation={"samples": 2, "every_steps": 3})
    with project_environment(root, monkeypatch, store=True):
        paths = prepare_backbones(model_config(), init=imported)
        assert paths["vision"] == str(files["vision"].resolve()) and paths["llm"] == str(files["llm"].resolve())
        with pytest.raises(ValueError, match="training aids need its coordinate tokens"):
            train_stage(2, model_config(), stage.model_copy(update={"pointing_weight": 1.0}), paths,
                        instructions=tiny_instructions, init=str(imported), local=True)
        result = train_stage(2, model_config(), stage, paths, instructions=tiny_instructions, init=str(imported),
                             local=True)
    before = torch.load(files["checkpoint"], weights_only=True)["model"]
    after = torch.load(export_checkpoint(result.model_dir, tmp_path / "tuned.pth"), weights_only=True)["model"]
    assert set(after) == {k for k in before if not k.endswith("inv_freq")}
    assert not torch.equal(after["llama_proj.weight"], before["llama_proj.weight"])
    assert any(not torch.equal(after[k], before[k]) for k in after if "lora_A" in k)
