"""One tuning stage as a loop over a `TrainContext` (Ray Train worker or a plain process).

Frozen vision encoder (its tokens computed once per image when `cache_features`),
trained alignment layer + LoRA; AdamW, linear warm-up then cosine decay, gradient
clipping; loss on answers only, logged per task; validation samples scored every
`validation.every_steps` so per-task learning curves show in MLflow, while the test splits
stay sealed (`sealed.py`: no file under `eval/` can be opened). Checkpoints hold
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

from ..data.items import load_items
from ..formats.benchmarks import EVAL_DIR
from ..model.config import ModelConfig
from ..model.skyeyegpt import SkyEyeGPT, build_model
from ..model.template import IGNORE, collate, encode_conversation
from ..model.tokenizer import grid_lookup
from .data import PixelCache, SourceSampler, normalise
from .pointing import PointingTargets, pointing_loss
from .sealed import sealed_folder
from .stage_config import StageConfig
from .validation import Validation

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
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`; with
    `anneal_by: time` it also ends with `time_budget_s` when that comes first. By default
    the clock stays out: a learning rate that depends on the machine's load, even for a few
    steps, makes reruns of one config different models (docs/model.md)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.anneal_by == "time" and cfg.time_budget_s:
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
            for k, t in zip(chunk, out, strict=True):
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


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, coords: CoordinateTargets | None = None
                    ) -> torch.Tensor:
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


class StageRun:
    """One stage on one worker: the model (from `init` or the latest checkpoint), its data
    samplers, the training aids, the optimizer, and the step, checkpoint and metrics that
    `run_stage` asks of it."""

    def __init__(self, ctx, config: dict):
        self.ctx = ctx
        self.cfg = cfg = StageConfig.model_validate(config["stage"])
        mcfg = ModelConfig.model_validate(config["model"])
        root = Path(config["instructions"])
        torch.manual_seed(cfg.seed)
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        bb = config["backbones"]
        self.resume_from = ctx.latest_checkpoint()
        self.model = build_model(mcfg, bb["vision"], bb["llm"], bb["tokenizer"], dtype=torch.float32,
                                 device=ctx.device, adapter=self.resume_from or config.get("init"))
        self.tok = self.model.tokenizer
        self.n_vis = self.model.visual_tokens_per_image()
        self._data(root, mcfg)
        self._aids(mcfg)
        self.validation = Validation(cfg.validation, root, self.model, self.features) if ctx.is_main else None
        self.params = [{"params": [p for p in self.model.alignment_layer.parameters() if p.requires_grad],
                        "lr_scale": cfg.alignment_lr_scale},
                       {"params": [p for n, p in self.model.named_parameters() if p.requires_grad and
                                   not n.startswith("alignment_layer.")], "lr_scale": 1.0}]
        self.optim = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = self.resumed_from = 0
        self.elapsed_before = 0.0  # training time spent before a restart: the time budget and schedule go on from it
        if self.resume_from:
            self._resume()
        self.ddp = ctx.prepare_model(self.model)
        self.per_worker = max(1, cfg.batch_size // ctx.world_size)
        self.n_replay = round(self.per_worker * cfg.replay_share) if self.replay_sampler else 0
        self.window: dict[str, list[float]] = defaultdict(list)
        self.tokens_seen = 0
        self.started = time.perf_counter() - self.elapsed_before

    def _data(self, root: Path, mcfg: ModelConfig) -> None:
        cfg = self.cfg
        self.items = load_items(root / cfg.data)
        self.sampler = SourceSampler(self.items, cfg.sampling, cfg.seed, self.ctx.rank)
        self.replay = load_items(root / cfg.replay) if cfg.replay and cfg.replay_share > 0 else []
        self.replay_sampler = SourceSampler(self.replay, cfg.replay_sampling, cfg.seed + 1, self.ctx.rank) \
            if self.replay else None
        self.features = VisualFeatures(self.model, PixelCache(root, mcfg.vision.image_size), cfg.cache_features)

    def _aids(self, mcfg: ModelConfig) -> None:
        """The tiny model's training aids, when the stage config turns them on."""
        cfg, self.pointing = self.cfg, None
        if mcfg.template != "skyeyegpt" and (cfg.pointing_weight > 0 or cfg.coordinate_sigma > 0):
            raise ValueError(f"pointing_weight {cfg.pointing_weight}, coordinate_sigma {cfg.coordinate_sigma}: the "
                             f"tiny model's training aids need its coordinate tokens; a {mcfg.template} model "
                             "trains without them (set both to 0, as configs/train/stage2_minigpt_v2.yaml)")
        if cfg.pointing_weight > 0:
            n_layers = self.model.llm.config.num_hidden_layers
            bad = [i for i in cfg.pointing_layers if not -n_layers <= i < n_layers]
            if bad:
                raise ValueError(f"pointing_layers: {bad} out of range for an LLM of {n_layers} layers")
            self.model.llm.set_attn_implementation("eager")  # SDPA returns no attention weights
            self.pointing = PointingTargets(self.tok, self.model.image_token_id, self.n_vis, mcfg.alignment.group,
                                            cfg.pointing_motion)
        self.coords = CoordinateTargets(self.tok, cfg.coordinate_sigma) if cfg.coordinate_sigma > 0 else None

    def _resume(self) -> None:
        state = torch.load(Path(self.resume_from) / TRAINER_STATE, map_location="cpu", weights_only=False)
        self.optim.load_state_dict(state["optimizer"])
        self.step = self.resumed_from = state["step"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        rngs = state["sampler_rng"]
        self.sampler.rng.bit_generator.state = rngs[min(self.ctx.rank, len(rngs) - 1)]
        if self.replay_sampler is not None and state.get("replay_rng"):
            self.replay_sampler.rng.bit_generator.state = state["replay_rng"][0]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write_checkpoint(self, folder: Path) -> None:
        cfg = self.cfg
        self.model.save(folder)
        torch.save({"optimizer": self.optim.state_dict(), "step": self.step, "stage": cfg.stage,
                    "elapsed_s": self.elapsed(),
                    "schedule": {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps},
                    "sampler_rng": [self.sampler.rng.bit_generator.state],
                    "replay_rng": [self.replay_sampler.rng.bit_generator.state] if self.replay_sampler else []},
                   Path(folder) / TRAINER_STATE)

    def _group_step(self, group_items: list, group_encs: list, share: float) -> int:
        """Forward and backward of part of a batch; `share` of the step's gradient. Returns its tokens."""
        batch = collate(group_encs, self.tok.pad_token_id)
        vis, frames = self.features.batch([(it.media, it.frames) for it in group_items])
        with torch.autocast(self.ctx.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.ddp(batch["input_ids"], batch["attention_mask"], labels=None, frames=frames, vision_tokens=vis,
                           output_attentions=self.pointing is not None)
        losses = per_sample_loss(out.logits, batch["labels"].to(self.ctx.device), self.coords)
        loss = losses.mean()
        if self.pointing is not None:
            targets = self.pointing(batch["input_ids"], batch["labels"], frames, vis)
            aux = pointing_loss(out.attentions, self.cfg.pointing_layers, targets)
            if aux is not None:
                loss = loss + self.cfg.pointing_weight * aux
                self.window["loss/pointing"].append(float(aux.detach()))
        (loss * share).backward()
        for it, value in zip(group_items, losses.detach().tolist(), strict=True):
            self.window[f"loss/{it.task}"].append(value)
            self.window["loss"].append(value)
        return int(batch["attention_mask"].sum())

    def train_step(self, lr: float) -> None:
        """One optimizer step over `grad_accum` batches, each run as length-sorted groups."""
        cfg = self.cfg
        for group in self.optim.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optim.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for accum in range(cfg.grad_accum):
            batch_items = [self.items[i] for i in self.sampler.draw(self.per_worker - self.n_replay)]
            if self.n_replay:
                batch_items += [self.replay[i] for i in self.replay_sampler.draw(self.n_replay)]
            encs = [encode_conversation(self.tok, list(it.turns), self.n_vis * it.frames, cfg.max_length,
                                        self.model.cfg.template)
                    for it in batch_items]
            # length groups: sorted by length, each group padded only to its own longest sample
            order = sorted(range(len(encs)), key=lambda i: len(encs[i].input_ids))
            groups = [g for g in np.array_split(order, cfg.length_groups) if len(g)]
            for gi, group in enumerate(groups):
                last_backward = accum == cfg.grad_accum - 1 and gi == len(groups) - 1
                # DDP averages gradients once per step, at its last backward
                with nullcontext() if last_backward or not hasattr(self.ddp, "no_sync") else self.ddp.no_sync():
                    share = len(group) / (len(encs) * cfg.grad_accum)
                    self.tokens_seen += self._group_step([batch_items[i] for i in group], [encs[i] for i in group],
                                                         share)
        torch.nn.utils.clip_grad_norm_([p for g in self.params for p in g["params"]], cfg.grad_clip)
        self.optim.step()
        self.step += 1
        self.window["step_time_s"].append(time.perf_counter() - t0)

    def window_metrics(self, lr: float) -> dict[str, float]:
        """The mean of each value since the last report, with lr and throughput; the window restarts."""
        elapsed = self.elapsed()
        metrics = {k: sum(v) / len(v) for k, v in self.window.items()}
        metrics |= {"lr": lr, "tokens_per_s": self.tokens_seen * self.ctx.world_size / max(elapsed, 1e-9),
                    "elapsed_s": elapsed}
        self.window.clear()
        return metrics

    def validation_scores(self) -> dict[str, float]:
        if self.validation is None:  # rank 0 alone scores
            return {}
        self.model.eval()
        try:
            return self.validation.score()
        finally:
            self.model.train()


def run_stage(ctx, config: dict) -> dict:
    """`config`: model (ModelConfig dict), stage (StageConfig dict), instructions (folder),
    backbones {vision, llm, tokenizer}, init (folder of a saved SkyEyeGPT to start from, or None).
    The instruction folder's test splits are sealed throughout."""
    with sealed_folder(Path(config["instructions"]) / EVAL_DIR):
        return _train(ctx, config)


def _train(ctx, config: dict) -> dict:
    run = StageRun(ctx, config)
    cfg = run.cfg
    last_metrics: dict[str, float] = {}
    last_ckpt = -1
    run.model.train()
    while run.step < cfg.max_steps:
        elapsed = agreed_elapsed(run.elapsed(), ctx.device)
        if cfg.time_budget_s and elapsed > cfg.time_budget_s:
            break
        lr = lr_at(run.step, cfg, elapsed)
        run.train_step(lr)
        last = run.step >= cfg.max_steps
        if run.step % cfg.log_every == 0 or last:
            metrics = run.window_metrics(lr)
            if run.step % cfg.validation.every_steps == 0 or last:
                metrics |= run.validation_scores()
            want_ckpt = run.step % cfg.checkpoint_every == 0 or last
            ctx.report(metrics, run.step, run.write_checkpoint if want_ckpt else None)
            last_ckpt = run.step if want_ckpt else last_ckpt
            last_metrics = metrics
    if last_ckpt != run.step:  # a time-budget stop still ends on a complete checkpoint and a scored model
        metrics = {"elapsed_s": run.elapsed()} | run.validation_scores()
        ctx.report(metrics, run.step, run.write_checkpoint)
        last_metrics |= metrics
    return {**last_metrics, "step": run.step, "resumed_from": run.resumed_from}
