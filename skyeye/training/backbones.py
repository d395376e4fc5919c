"""The `backbones` step: offline stand-ins for EVA-CLIP and LLaMA-2, pretrained from
scratch on the SkyEye-Synth train split and saved as ordinary Hugging Face checkpoints.

Objectives (and why):
- Vision encoder (ViT): dense per-patch prediction on the grounding train images
  (DIOR-RSVG / RSVG annotations): the category of the object covering the patch, its
  colour when the expression names one, its box (normalised x1 y1 x2 y2 and 0-100 grid
  bins), and the patch's mean colour and its own row and column on every image. With
  `scene_batch`, the frames a clip is trained with (and RSICD images) also teach every
  patch the class their layout names (CapERA's ERA event, RSICD's scene class in the file
  name): a clip's event is what its caption must name. A CLIP-style contrastive objective
  would need far more data and time than 2 cores give; dense targets teach, in a couple
  of minutes, what the LLM must read from a visual token: what is here, what colour, and
  where the object lies. With `count_batch`, the caption train images (UCM, Sydney, RSICD)
  also teach how many objects of each kind they hold, read from their own captions
  ("five buildings and one tennis court"): a per-patch head summed over the image must
  give the counts, so every visual token says how many objects it holds and the LLM
  can add them up. Without it, captions named the scene's usual count, not the image's.
- LLM (LLaMA architecture): next-token prediction on the instruction text (questions
  and answers, no image), so it knows the answer language and the box format before
  stage 1; the coordinate tokens `<0>`..`<100>` start from ordered (sinusoidal)
  embeddings so that neighbouring values are neighbours.
Results are cached by the instruction data's content hash, the config and the code
that pretrains them (`skyeye.tracking.codehash`), and logged to MLflow. What each
objective changed: docs/experiments/.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.instructions import NUMBER_WORDS
from ..data.items import load_items
from ..data.readers import read_benchmark
from ..formats.boxes import GRID
from ..formats.prompts import VIDEO_FRAMES
from ..model.config import CLIP_MEAN, CLIP_STD
from ..model.template import encode_conversation
from ..model.tiny import BackbonesConfig, new_llm, new_vision_tower
from ..model.tokenizer import GRID_TOKENS, instruction_texts, train_tokenizer
from ..tracking.codehash import code_digest
from .data import PixelCache, normalise

COLOUR_WORDS = ("white", "red", "blue", "yellow", "grey", "green")
MEAN, STD = CLIP_MEAN, CLIP_STD  # the model's default normalisation: the encoder meets the same there


def cache_key(instructions: Path, cfg: BackbonesConfig) -> str:
    # the pretraining code (this module and all it imports) is in the key: a change to it
    # makes new backbones, with no version number to remember to bump
    h = hashlib.sha256(f"{code_digest([__name__])}:{cfg.model_dump_json()}".encode())
    for name in ("stage1.json", "stage2.json"):
        h.update((Path(instructions) / name).read_bytes())
    return h.hexdigest()[:16]


def _train_for(steps: int | None, seconds: float, lr: float, params: list, desc: str, step_fn, log, part: str
               ) -> dict[str, float]:
    """AdamW with warm-up and cosine decay over `steps` optimizer steps (`seconds` then only a
    safety net), or over the wall-clock budget `seconds` when `steps` is None; `step_fn()`
    returns (loss, metrics) for one batch. A progress bar shows the budget being spent. The
    step count is reported as `<part>/steps`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    start, step, metrics = time.perf_counter(), 0, {}
    bar = tqdm(total=steps or int(seconds), desc=desc, unit="step" if steps else "s")
    while (elapsed := time.perf_counter() - start) < seconds and (steps is None or step < steps):
        # the schedule follows the steps when they are the budget (the clock only stops), so a
        # rerun pretrains the same backbones whatever the load; a time budget anneals by time
        progress = step / steps if steps else elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        loss, metrics = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        metrics[f"{part}/steps"] = step
        if step % 20 == 0:
            log(metrics, step)
        bar.n = step if steps else min(int(time.perf_counter() - start), bar.total)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.refresh()
    bar.close()
    return metrics


# ---------------------------------------------------------------- vision
class DenseHeads(torch.nn.Module):
    def __init__(self, width: int, n_classes: int, grid: int, n_scenes: int = 0, n_counted: int = 0):
        super().__init__()
        self.cls = torch.nn.Linear(width, n_classes + 1)  # 0 = background
        self.colour = torch.nn.Linear(width, len(COLOUR_WORDS))
        self.box = torch.nn.Linear(width, 4)
        # each box side also as a 0-100 grid bin: the LLM answers in grid tokens, so a
        # feature that names the bin is one linear read-out away from the right token
        self.box_bins = torch.nn.Linear(width, 4 * (GRID + 1))
        self.rgb = torch.nn.Linear(width, 3)
        self.row = torch.nn.Linear(width, grid)  # where the patch itself lies: every visual token
        self.col = torch.nn.Linear(width, grid)  # then says where it is, object or background
        self.scene = torch.nn.Linear(width, max(n_scenes, 1))
        self.count = torch.nn.Linear(width, max(n_counted, 1))


_STOP = {"and", "are", "is", "in", "on", "with", "at", "of", "to", "the", "a", "an", "near", "next", "around"}


def caption_counts(captions) -> dict[str, int]:
    """Object counts a set of reference captions states: for each "<number word> <noun>"
    phrase ("three storage tanks", "one tennis court"), the noun singular, the largest
    count any reference gives ("two grey buildings" is a part of "five buildings")."""
    counts: dict[str, int] = {}
    for caption in captions:
        words = "".join(c if c.isalpha() else " " for c in caption.lower()).split()
        for i, w in enumerate(words[:-1]):
            if w not in NUMBER_WORDS:
                continue
            phrase = []
            for nxt in words[i + 1:i + 4]:  # up to "<colour> <noun> <noun>"
                if nxt in _STOP or nxt in NUMBER_WORDS:
                    break
                phrase.append(nxt)
            if phrase:
                noun = phrase[-1][:-1] if phrase[-1].endswith("s") and not phrase[-1].endswith("ss") else phrase[-1]
                counts[noun] = max(counts.get(noun, 0), NUMBER_WORDS.index(w))
    return counts


def count_images(synth: Path, side: int, min_images: int = 10) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 caption train images that state counts, their counts (N, C) and the C nouns
    counted in at least `min_images` images. A noun an image's captions leave out counts 0:
    captions that count, count every kind of object they see."""
    pixels, images, stated = PixelCache(Path("/"), side), [], []
    for name in ("ucm_captions", "sydney_captions", "rsicd"):
        if not (synth / name).exists():
            continue
        for s in read_benchmark(name, synth / name, ["train"])[0]:
            counts = caption_counts(s.captions)
            if counts and not s.is_video:
                images.append(pixels.get(str(s.image)))
                stated.append(counts)
    seen = Counter(noun for c in stated for noun in c)
    nouns = sorted(n for n, k in seen.items() if k >= min_images)
    if not images or not nouns:
        return torch.zeros(0, 3, side, side, dtype=torch.uint8), torch.zeros(0, 0), nouns
    target = torch.tensor([[float(c.get(n, 0)) for n in nouns] for c in stated])
    return torch.stack(images), target, nouns


def scene_frames(synth: Path, side: int, frames: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 frames and class ids of the train images / clips whose layout names a scene
    class or an event; classes are namespaced by benchmark (`capera:boating`)."""
    pixels, chunks, labels = PixelCache(Path("/"), side), [], []
    for name in ("capera", "rsicd"):
        if not (synth / name).exists():
            continue
        for s in read_benchmark(name, synth / name, ["train"])[0]:
            if s.scene_class:
                x = pixels.get(str(s.image), frames if s.is_video else 1)
                chunks.append(x if x.dim() == 4 else x[None])
                labels += [f"{name}:{s.scene_class}"] * len(chunks[-1])
    classes = sorted(set(labels))
    if not chunks:
        return torch.zeros(0, 3, side, side, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), classes
    return torch.cat(chunks), torch.tensor([classes.index(c) for c in labels]), classes


def _dense_targets(samples, side: int, patch: int, classes: list[str]):
    """Per image: class, colour (-100 unknown) and box per patch, from the covering object."""
    grid = side // patch
    by_image: dict[Path, list] = {}
    for s in samples:
        by_image.setdefault(s.image, []).append(s)
    targets = {}
    centres = (np.arange(grid) + 0.5) / grid
    for image, objs in by_image.items():
        cls = np.zeros((grid, grid), np.int64)
        col = np.full((grid, grid), -100, np.int64)
        box = np.zeros((grid, grid, 4), np.float32)
        # larger first, so a small object drawn over a large one wins its patches
        for s in sorted(objs, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1])):
            w, h = s.image_size
            x1, y1, x2, y2 = s.box[0] / w, s.box[1] / h, s.box[2] / w, s.box[3] / h
            inside = ((centres[None, :] >= x1) & (centres[None, :] <= x2)
                      & (centres[:, None] >= y1) & (centres[:, None] <= y2))
            if not inside.any():  # small object: the patch holding its centre
                inside = np.zeros_like(inside)
                inside[min(int((y1 + y2) / 2 * grid), grid - 1), min(int((x1 + x2) / 2 * grid), grid - 1)] = True
            cls[inside] = classes.index(s.category) + 1
            words = s.expression.lower().split()
            col[inside] = next((COLOUR_WORDS.index(c) for c in COLOUR_WORDS if c in words), -100)
            box[inside] = (x1, y1, x2, y2)
        targets[image] = (cls.reshape(-1), col.reshape(-1), box.reshape(-1, 4))
    return targets


# The dense losses' weights, each against the class loss's 1: the box's L1 on normalised
# coordinates is small next to the cross-entropies, so it is scaled up; its 0-100 bins say the
# same thing again, coarser, so they weigh half.
BOX_L1_WEIGHT = 5
BOX_BINS_WEIGHT = 0.5


@dataclass
class _GroundingTargets:
    """The grounding train images (uint8) and each one's per-patch class (0: background),
    colour (-100: unknown) and box targets."""
    classes: list[str]
    u8: torch.Tensor
    cls: torch.Tensor
    colour: torch.Tensor
    box: torch.Tensor


def _grounding_targets(synth: Path, spec) -> _GroundingTargets:
    samples = []
    for name in ("dior_rsvg", "rsvg"):
        if (synth / name).exists():
            # RSVG as released names no object category: its objects give no class targets
            samples += [s for s in read_benchmark(name, synth / name, ["train"])[0] if s.category]
    if not samples:
        raise ValueError(f"{synth}: no DIOR-RSVG/RSVG train split to pretrain the vision encoder on")
    classes = sorted({s.category for s in samples})
    targets = _dense_targets(samples, spec.image_size, spec.patch_size, classes)
    images = sorted(targets)
    pixels = PixelCache(Path("/"), spec.image_size)
    return _GroundingTargets(classes, torch.stack([pixels.get(str(p)) for p in images]),
                             *(torch.from_numpy(np.stack([targets[p][i] for p in images])) for i in range(3)))


class _VisionObjective:
    """The loss of one pretraining batch (`step`): the dense per-patch losses on grounding
    images, plus the scene and count losses when their batches are on (`cfg.scene_batch`,
    `cfg.count_batch`). Batches are drawn from a generator seeded with `cfg.seed`."""

    def __init__(self, cfg: BackbonesConfig, tower, heads: DenseHeads, grounding: _GroundingTargets,
                 scenes: tuple[torch.Tensor | None, torch.Tensor], counts: tuple[torch.Tensor | None, torch.Tensor]):
        self.cfg, self.tower, self.heads, self.data = cfg, tower, heads, grounding
        (self.scene_u8, self.scene_t), (self.count_u8, self.count_t) = scenes, counts
        self.rng = np.random.default_rng(cfg.seed)
        g = cfg.vision.image_size // cfg.vision.patch_size
        self.rows, self.cols = torch.arange(g * g) // g, torch.arange(g * g) % g

    def step(self) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, heads = self.cfg, self.heads
        idx = torch.from_numpy(self.rng.integers(0, len(self.data.u8), cfg.vision_batch))
        x = normalise(self.data.u8[idx], MEAN, STD)
        j = torch.from_numpy(self.rng.integers(0, len(self.scene_t), cfg.scene_batch)) if len(self.scene_t) else None
        k = torch.from_numpy(self.rng.integers(0, len(self.count_t), cfg.count_batch)) if len(self.count_t) else None
        tokens, scene_tokens, count_tokens = self._encode(x, j, k)
        dense = self._dense_losses(tokens, x, idx)
        loss = dense["cls"] + dense["colour"] + BOX_L1_WEIGHT * dense["box"] + BOX_BINS_WEIGHT * dense["box_bins"] \
            + dense["rgb"] + dense["position"]
        extra = {}
        if j is not None:  # every patch names the class, so every visual token the LLM reads carries it
            loss_scene = F.cross_entropy(heads.scene(scene_tokens).flatten(0, 1),
                                         self.scene_t[j].repeat_interleave(scene_tokens.shape[1]))
            loss = loss + cfg.scene_weight * loss_scene
            extra["vision/loss_scene"] = loss_scene.item()
        if k is not None:  # a count is a sum of what each patch holds: the LLM can add visual tokens up
            predicted = F.softplus(heads.count(count_tokens)).sum(1)  # (B, C)
            loss_count = F.smooth_l1_loss(predicted, self.count_t[k])
            loss = loss + cfg.count_weight * loss_count
            extra["vision/loss_count"] = loss_count.item()
        return loss, {**extra, "vision/loss": loss.item(), "vision/loss_cls": dense["cls"].item(),
                      "vision/loss_box": dense["box"].item(), "vision/loss_box_bins": dense["box_bins"].item(),
                      "vision/loss_colour": dense["colour"].item(), "vision/loss_position": dense["position"].item()}

    def _encode(self, x: torch.Tensor, j: torch.Tensor | None, k: torch.Tensor | None):
        """One forward pass over the grounding, scene and count images together; their patch
        tokens (CLS dropped), each (B, N, D)."""
        parts = [x] + ([] if j is None else [normalise(self.scene_u8[j], MEAN, STD)]) \
            + ([] if k is None else [normalise(self.count_u8[k], MEAN, STD)])
        tokens = self.tower(pixel_values=torch.cat(parts)).last_hidden_state[:, 1:]
        n, n_scene = len(x), 0 if j is None else len(j)
        return tokens[:n], tokens[n:n + n_scene], tokens[n + n_scene:]

    def _dense_losses(self, tokens: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per patch: the covering object's class, colour and box (as coordinates and as 0-100
        bins), the patch's mean colour, and its own row and column."""
        heads, cls_t, col_t, box_t = self.heads, self.data.cls[idx], self.data.colour[idx], self.data.box[idx]
        patch_rgb = F.avg_pool2d(x, self.cfg.vision.patch_size).flatten(2).transpose(1, 2)  # (B, N, 3)
        fg = cls_t > 0
        out = {"cls": F.cross_entropy(heads.cls(tokens).flatten(0, 1), cls_t.flatten())}
        out["colour"] = F.cross_entropy(heads.colour(tokens).flatten(0, 1), col_t.flatten(), ignore_index=-100) \
            if (col_t >= 0).any() else tokens.sum() * 0
        if fg.any():
            out["box"] = F.l1_loss(torch.sigmoid(heads.box(tokens))[fg], box_t[fg])
            bins = (box_t[fg] * 100).long().clamp(0, 100)  # (F, 4)
            out["box_bins"] = F.cross_entropy(heads.box_bins(tokens)[fg].view(-1, GRID + 1), bins.view(-1))
        else:
            out["box"] = out["box_bins"] = tokens.sum() * 0
        out["rgb"] = F.mse_loss(heads.rgb(tokens), patch_rgb)
        out["position"] = F.cross_entropy(heads.row(tokens).flatten(0, 1), self.rows.repeat(len(idx))) + \
            F.cross_entropy(heads.col(tokens).flatten(0, 1), self.cols.repeat(len(idx)))
        return out


def pretrain_vision(synth: Path, cfg: BackbonesConfig, out: Path, log) -> dict[str, float]:
    """Pretrain the vision tower on `synth`'s train images (see the module's docstring) and
    save it, with what it learnt to name (skyeye_pretraining.json), to `out`."""
    torch.manual_seed(cfg.seed)
    spec = cfg.vision
    grounding = _grounding_targets(synth, spec)
    tower = new_vision_tower(spec)
    g = spec.image_size // spec.patch_size
    scene_u8, scene_t, scenes = scene_frames(synth, spec.image_size, VIDEO_FRAMES) if cfg.scene_batch else \
        (None, torch.zeros(0, dtype=torch.long), [])
    count_u8, count_t, counted = count_images(synth, spec.image_size) if cfg.count_batch else \
        (None, torch.zeros(0, 0), [])
    heads = DenseHeads(spec.hidden_size, len(grounding.classes), g, len(scenes), len(counted))
    objective = _VisionObjective(cfg, tower, heads, grounding, (scene_u8, scene_t), (count_u8, count_t))
    params = list(tower.parameters()) + list(heads.parameters())
    metrics = _train_for(cfg.vision_steps, cfg.vision_seconds, cfg.vision_lr, params, "backbones: vision encoder",
                         objective.step, log, "vision")
    tower.save_pretrained(out)
    summary = {"classes": grounding.classes, "scene_classes": scenes, "counted": counted, "grid": g, **metrics}
    (out / "skyeye_pretraining.json").write_text(json.dumps(summary, indent=1))
    return metrics


# ---------------------------------------------------------------- LLM
def _ordered_grid_embeddings(llm, tok) -> None:
    """Coordinate tokens start from sinusoidal embeddings of their value (plus noise)."""
    ids = tok.convert_tokens_to_ids(GRID_TOKENS)
    emb_in, emb_out = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    d = emb_in.shape[1]
    k = torch.arange(len(ids), dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(200.0) / d))[None, :]
    table = torch.zeros(len(ids), d)
    table[:, 0::2], table[:, 1::2] = torch.sin(k * freq), torch.cos(k * freq)
    with torch.no_grad():
        scale = emb_in.std()
        emb_in[ids] = table * scale + emb_in[ids] * 0.1
        if emb_out is not emb_in:
            emb_out[ids] = table * emb_out.std() + emb_out[ids] * 0.1


def pretrain_llm(instructions: Path, tok, cfg: BackbonesConfig, out: Path, log) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    items = load_items(instructions / "stage1.json") + load_items(instructions / "stage2.json")
    llm = new_llm(cfg.llm, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    _ordered_grid_embeddings(llm, tok)
    # text only: the image placeholder is left out, every token is a target
    seqs = [encode_conversation(tok, list(it.turns), 0, cfg.llm.max_positions).input_ids for it in items]
    rng = np.random.default_rng(cfg.seed)

    def step():
        batch = [seqs[i] for i in rng.integers(0, len(seqs), cfg.llm_batch)]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(batch):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
        loss = llm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        return loss, {"llm/loss": loss.item()}

    metrics = _train_for(cfg.llm_steps, cfg.llm_seconds, cfg.llm_lr, list(llm.parameters()), "backbones: LLM",
                         step, log, "llm")
    llm.save_pretrained(out)
    tok.save_pretrained(out)
    return metrics


def build_backbones(instructions: Path, synth: Path, cache_root: Path, cfg: BackbonesConfig,
                    log=lambda metrics, step: None) -> tuple[dict[str, str], bool]:
    """Pretrained tiny backbones for this data and config: from the cache, or trained now.
    Returns ({vision, llm, tokenizer} folders, whether they came from the cache)."""
    instructions, synth = Path(instructions), Path(synth)
    key = cache_key(instructions, cfg)
    final = Path(cache_root) / key
    paths = {"vision": str(final / "vision"), "llm": str(final / "llm"), "tokenizer": str(final / "llm"), "key": key}
    if (final / "COMPLETE").exists():
        return paths, True
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = train_tokenizer(instruction_texts([instructions / "stage1.json", instructions / "stage2.json"]),
                              tmp / "tokenizer", cfg.vocab_size)
        vm = pretrain_vision(synth, cfg, tmp / "vision", log)
        lm = pretrain_llm(instructions, tok, cfg, tmp / "llm", log)
        (tmp / "metrics.json").write_text(json.dumps({**vm, **lm}, indent=1))
        (tmp / "COMPLETE").write_text(key)  # written last: a half-trained cache entry never looks complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return paths, False
