"""One tuning stage as a loop over a `TrainContext` (Ray Train worker or a plain process).

Frozen vision encoder (its tokens computed once per image when `cache_features`),
trained alignment layer + LoRA; AdamW, linear warm-up then cosine decay, gradient
clipping; loss on answers only, logged per task; held-back test samples scored every
`held_out.every_steps` so per-task learning curves show in MLflow. Checkpoints hold
the trained parts (a loadable SkyEyeGPT folder) plus optimizer, scheduler and step.
Each batch may run as length-sorted groups (less padding, same gradient); the tiny
model's training aids, soft coordinate targets and the pointing loss (pointing.py),
are stage-config choices that are off in the paper's recipe.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.skyeyegpt import SkyEyeGPT, build_model
from ..model.template import IGNORE, collate, encode_conversation
from ..model.tokenizer import grid_lookup
from .data import PixelCache, SourceSampler, load_items, normalise
from .held_out import HeldOut
from .pointing import PointingTargets, pointing_loss
from .stage_config import StageConfig

TRAINER_STATE = "trainer_state.pt"


def agreed_elapsed(seconds: float, device: torch.device | str = "cpu") -> float:
    """The longest elapsed time over the DDP ranks. Every rank must take the same time-budget
    stop and the same learning rate: a rank that stops alone leaves the others waiting in the
    next gradient all-reduce forever, and ranks on their own clocks would drift apart."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def lr_at(step: int, cfg: StageConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`, or at the end
    of `time_budget_s` when that comes first (a fixed wall-clock budget still anneals)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.time_budget_s:
        progress = max(progress, elapsed_s / cfg.time_budget_s)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class VisualFeatures:
    """Frozen-encoder tokens per media item, computed once (the encoder never changes)."""

    def __init__(self, model: SkyEyeGPT, pixels: PixelCache, enabled: bool):
        self.model, self.pixels, self.enabled = model, pixels, enabled
        self._store: dict[tuple[str, int], torch.Tensor] = {}

    def _encode(self, u8: torch.Tensor) -> torch.Tensor:
        v = self.model.cfg.vision
        with torch.no_grad():
            return self.model.vision(normalise(u8, v.mean, v.std).to(self.model.device))

    def warm(self, keys: list[tuple[str, int]], batch: int = 64) -> None:
        todo = [k for k in dict.fromkeys(keys) if k not in self._store]
        images = [k for k in todo if k[1] == 1]
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            out = self._encode(torch.stack([self.pixels.get(*k) for k in chunk]))
            for k, t in zip(chunk, out):
                self._store[k] = t.to(torch.bfloat16) if self.enabled else t
        for k in (k for k in todo if k[1] > 1):
            self._store[k] = self._encode(self.pixels.get(*k)).to(torch.bfloat16)

    def batch(self, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, list[int]]:
        """(total images, N, D) encoder tokens and frames per sample."""
        if not self.enabled:
            self._store.clear()
        self.warm(keys)
        parts = [self._store[k] if k[1] > 1 else self._store[k].unsqueeze(0) for k in keys]
        return torch.cat(parts).float(), [k[1] for k in keys]


class CoordinateTargets:
    """Soft targets for coordinate tokens: a Gaussian of width `sigma` grid units around the
    true value instead of one exact token out of 101, so an answer one unit off earns most of
    the credit and the tiny model learns the order of the grid quickly (as distribution-style
    box regression does). sigma = 0 keeps plain cross-entropy (the paper)."""

    def __init__(self, tokenizer, sigma: float):
        self.grid_ids, self.value_of = grid_lookup(tokenizer)
        k = torch.arange(len(self.grid_ids), dtype=torch.float32)
        self.table = torch.softmax(-(k[None, :] - k[:, None]) ** 2 / (2 * sigma ** 2), -1)  # (101, 101) rows: truth

    def loss(self, logp: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of coordinate positions, their soft cross-entropy) for (N, V) log-probs and (N,) labels."""
        values = self.value_of.to(labels.device)[labels.clamp(min=0)].masked_fill(labels < 0, -1)
        mask = values >= 0
        q = self.table.to(logp.device)[values[mask]]
        return mask, -(q * logp[mask][:, self.grid_ids.to(logp.device)]).sum(-1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, coords: CoordinateTargets | None = None) -> torch.Tensor:
    """Mean answer-token cross-entropy of each sample (B,)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    flat_labels = shift_labels.reshape(-1)
    logp = F.log_softmax(shift_logits.reshape(-1, shift_logits.shape[-1]), -1)
    tok = F.nll_loss(logp, flat_labels, ignore_index=IGNORE, reduction="none")
    if coords is not None:
        mask, soft = coords.loss(logp, flat_labels)
        tok = tok.masked_scatter(mask, soft)
    tok = tok.view(shift_labels.shape)
    mask = (shift_labels != IGNORE).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


def run_stage(ctx, config: dict) -> dict:
    """`config`: model (ModelConfig dict), stage (StageConfig dict), instructions (folder),
    backbones {vision, llm, tokenizer}, init (folder of a saved SkyEyeGPT to start from, or None)."""
    cfg = StageConfig.model_validate(config["stage"])
    mcfg = ModelConfig.model_validate(config["model"])
    root = Path(config["instructions"])
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    bb = config["backbones"]
    resume = ctx.latest_checkpoint()
    start_from = resume or config.get("init")
    model = build_model(mcfg, bb["vision"], bb["llm"], bb["tokenizer"], dtype=torch.float32, device=ctx.device,
                        adapter=start_from)
    tok = model.tokenizer
    n_vis = model.visual_tokens_per_image()
    items = load_items(root / cfg.data)
    sampler = SourceSampler(items, cfg.sampling, cfg.seed, ctx.rank)
    replay = load_items(root / cfg.replay) if cfg.replay and cfg.replay_share > 0 else []
    replay_sampler = SourceSampler(replay, cfg.replay_sampling, cfg.seed + 1, ctx.rank) if replay else None
    pixels = PixelCache(root, mcfg.vision.image_size)
    features = VisualFeatures(model, pixels, cfg.cache_features)
    pointing = None
    if cfg.pointing_weight > 0:
        n_layers = model.llm.config.num_hidden_layers
        bad = [i for i in cfg.pointing_layers if not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(f"pointing_layers: {bad} out of range for an LLM of {n_layers} layers")
        model.llm.set_attn_implementation("eager")  # SDPA returns no attention weights
        pointing = PointingTargets(tok, model.image_token_id, n_vis, mcfg.alignment.group, cfg.pointing_motion)
    coords = CoordinateTargets(tok, cfg.coordinate_sigma) if cfg.coordinate_sigma > 0 else None
    held_out = HeldOut(cfg.held_out, root, items + replay, model, features) if ctx.is_main else None

    params = [{"params": [p for p in model.alignment_layer.parameters() if p.requires_grad],
               "lr_scale": cfg.alignment_lr_scale},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and
                          not n.startswith("alignment_layer.")], "lr_scale": 1.0}]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = resumed_from = 0
    elapsed_before = 0.0  # training time spent before a restart: the time budget and schedule go on from it
    if resume:
        state = torch.load(Path(resume) / TRAINER_STATE, map_location="cpu", weights_only=False)
        optim.load_state_dict(state["optimizer"])
        step = resumed_from = state["step"]
        elapsed_before = state.get("elapsed_s", 0.0)
        sampler.rng.bit_generator.state = state["sampler_rng"][min(ctx.rank, len(state["sampler_rng"]) - 1)]
        if replay_sampler is not None and state.get("replay_rng"):
            replay_sampler.rng.bit_generator.state = state["replay_rng"][0]
    ddp = ctx.prepare_model(model)
    per_worker = max(1, cfg.batch_size // ctx.world_size)
    n_replay = round(per_worker * cfg.replay_share) if replay_sampler else 0

    def write_checkpoint(folder: Path) -> None:
        model.save(folder)
        torch.save({"optimizer": optim.state_dict(), "step": step, "stage": cfg.stage,
                    "elapsed_s": time.perf_counter() - started, "schedule": {"lr": cfg.lr, "min_lr": cfg.min_lr,
                                                                           "warmup_steps": cfg.warmup_steps},
                    "sampler_rng": [sampler.rng.bit_generator.state],
                    "replay_rng": [replay_sampler.rng.bit_generator.state] if replay_sampler else []},
                   Path(folder) / TRAINER_STATE)

    def _group_step(group_items, group_encs, share: float) -> int:
        """Forward and backward of part of a batch; `share` of the step's gradient. Returns its tokens."""
        batch = collate(group_encs, tok.pad_token_id)
        vis, frames = features.batch([(it.media, it.frames) for it in group_items])
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = ddp(batch["input_ids"], batch["attention_mask"], labels=None, frames=frames, vision_tokens=vis,
                      output_attentions=pointing is not None)
        losses = per_sample_loss(out.logits, batch["labels"].to(ctx.device), coords)
        loss = losses.mean()
        if pointing is not None:
            aux = pointing_loss(out.attentions, cfg.pointing_layers, pointing(batch["input_ids"], batch["labels"], frames, vis))
            if aux is not None:
                loss = loss + cfg.pointing_weight * aux
                window["loss/pointing"].append(float(aux.detach()))
        (loss * share).backward()
        for it, value in zip(group_items, losses.detach().tolist()):
            window[f"loss/{it.task}"].append(value)
            window["loss"].append(value)
        return int(batch["attention_mask"].sum())

    started, tokens_seen, last_metrics, last_ckpt = time.perf_counter() - elapsed_before, 0, {}, -1
    window: dict[str, list[float]] = defaultdict(list)
    model.train()
    while step < cfg.max_steps:
        elapsed = agreed_elapsed(time.perf_counter() - started, ctx.device)
        if cfg.time_budget_s and elapsed > cfg.time_budget_s:
            break
        lr = lr_at(step, cfg, elapsed)
        for group in optim.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optim.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for accum in range(cfg.grad_accum):
            batch_items = [items[i] for i in sampler.draw(per_worker - n_replay)]
            if n_replay:
                batch_items += [replay[i] for i in replay_sampler.draw(n_replay)]
            encs = [encode_conversation(tok, list(it.turns), n_vis * it.frames, cfg.max_length) for it in batch_items]
            # length groups: sorted by length, each group padded only to its own longest sample
            order = sorted(range(len(encs)), key=lambda i: len(encs[i].input_ids))
            groups = [g for g in np.array_split(order, cfg.length_groups) if len(g)]
            for gi, group in enumerate(groups):
                last_backward = accum == cfg.grad_accum - 1 and gi == len(groups) - 1
                # DDP averages gradients once per step, at its last backward
                with nullcontext() if last_backward or not hasattr(ddp, "no_sync") else ddp.no_sync():
                    share = len(group) / (len(encs) * cfg.grad_accum)
                    tokens_seen += _group_step([batch_items[i] for i in group], [encs[i] for i in group], share)
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], cfg.grad_clip)
        optim.step()
        step += 1
        window["step_time_s"].append(time.perf_counter() - t0)
        last = step >= cfg.max_steps
        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - started
            metrics = {k: sum(v) / len(v) for k, v in window.items()}
            metrics |= {"lr": lr, "tokens_per_s": tokens_seen * ctx.world_size / max(elapsed, 1e-9),
                        "elapsed_s": elapsed}
            window.clear()
            if held_out and (step % cfg.held_out.every_steps == 0 or last):
                model.eval()
                metrics |= held_out.score()
                model.train()
            want_ckpt = step % cfg.checkpoint_every == 0 or last
            ctx.report(metrics, step, write_checkpoint if want_ckpt else None)
            last_ckpt = step if want_ckpt else last_ckpt
            last_metrics = metrics
    if last_ckpt != step:  # a time-budget stop still ends on a complete checkpoint and a scored model
        metrics = {"elapsed_s": time.perf_counter() - started}
        if held_out:
            model.eval()
            metrics |= held_out.score()
        ctx.report(metrics, step, write_checkpoint)
        last_metrics |= metrics
    return {**last_metrics, "step": step, "resumed_from": resumed_from}
