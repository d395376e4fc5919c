"""Grounding attention loss: a training aid for the tiny model, not part of the paper.

While it writes a box `{<x1><y1><x2><y2>}`, the decoder should look at the visual tokens
that show the object. A from-scratch tiny LLM finds that by itself only after a long
flat start; this loss shortens it: at the positions that predict the four coordinates, the attention of the chosen
decoder layers (mean over heads) should put its mass on the visual tokens whose image
region overlaps the box:  loss = -log(attention mass on those tokens).

The boxes come from the answers themselves (any answer turn holding boxes: refer,
detection, conversation turns), so no extra annotation is needed. Visual token k covers
the patches k*group .. k*group+group-1 of the encoder's square, row-major patch grid,
as the alignment layer concatenates them.

Clips (`motion`): a clip's captions say what moves and which way, and a clip has no
boxes, but the frozen encoder shows where things move: the visual tokens whose features
change from one frame to the next. At every answer position of a clip that moves, the
same loss asks the decoder to look at those tokens: runs that did not look at what moves
did not learn the direction of motion. The measurements behind both:
docs/experiments/2026-11-29-grounding.md and
docs/experiments/2026-11-29-capera-direction-of-motion.md.
"""
from __future__ import annotations

import math

import torch

from ..formats.boxes import GRID
from ..model.template import IGNORE
from ..model.tokenizer import grid_lookup


def token_regions(n_visual: int, group: int) -> torch.Tensor:
    """(n_visual, 4) bounding box of each visual token's patches, in grid units (0-GRID)."""
    n_patches = n_visual * group
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patches do not form a square grid")
    cell = GRID / side
    out = []
    for k in range(n_visual):
        rows, cols = zip(*(divmod(k * group + j, side) for j in range(group)), strict=True)
        out.append((min(cols) * cell, min(rows) * cell, (max(cols) + 1) * cell, (max(rows) + 1) * cell))
    return torch.tensor(out)


def overlapping(regions: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(n_visual,) bool: tokens whose region overlaps the box (the one holding its centre at least)."""
    x1, y1, x2, y2 = box
    hit = (regions[:, 0] < x2) & (regions[:, 2] > x1) & (regions[:, 1] < y2) & (regions[:, 3] > y1)
    if not hit.any():  # a degenerate box: the token holding its centre
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        hit = (regions[:, 0] <= cx) & (regions[:, 2] >= cx) & (regions[:, 1] <= cy) & (regions[:, 3] >= cy)
    return hit


class PointingTargets:
    """Finds, in a training batch, each answer box and the visual tokens it covers."""

    def __init__(self, tokenizer, image_token_id: int, n_visual: int, group: int, motion: bool = False):
        self.value_of = grid_lookup(tokenizer)[1]
        self.image_token_id, self.n_visual, self.group, self.motion = image_token_id, n_visual, group, motion
        self.regions = token_regions(n_visual, group)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, frames: list[int],
                 vision_tokens: torch.Tensor | None = None) -> list[tuple]:
        """[(row, query positions, visual positions, target mask)]: one per answer box, and one
        per moving clip when `motion` (its frozen-encoder `vision_tokens`, (images, N, D), needed)."""
        values = self.value_of[labels.clamp(min=0)].masked_fill(labels == IGNORE, -1)  # (B, T) grid value or -1
        out = []
        # each sample's encoder tokens, one entry per frame (as the model's embedding step splits them)
        per_sample = torch.split(vision_tokens, list(frames)) if self.motion and vision_tokens is not None else None
        for b in range(input_ids.shape[0]):
            if frames[b] != 1:  # a clip holds no boxes; its movers, if asked
                if per_sample is not None:
                    mask = movers(per_sample[b], self.group)
                    answer = (labels[b] != IGNORE).nonzero().flatten()
                    if mask.any() and len(answer):
                        visual = (input_ids[b] == self.image_token_id).nonzero().flatten()[: len(mask)]
                        out.append((b, answer - 1, visual, mask))
                continue
            visual = (input_ids[b] == self.image_token_id).nonzero().flatten()[: self.n_visual]
            run: list[int] = []
            for p in (values[b] >= 0).nonzero().flatten().tolist():
                run = run + [p] if run and run[-1] == p - 1 else [p]  # a box: four coordinate tokens in a row
                if len(run) == 4:  # the logits at p-1 predict the token at p
                    box = tuple(values[b, run].tolist())
                    out.append((b, torch.tensor(run) - 1, visual, overlapping(self.regions, box)))
                    run = []
        return out


def movers(tokens: torch.Tensor, group: int, share: float = 0.5) -> torch.Tensor:
    """(frames * N/group,) bool: a clip's visual tokens (frame by frame, as the LLM sees them)
    whose frozen-encoder features change the most, at least `share` of the clip's largest
    change, between their frame and the one before or after. All False for a still clip."""
    f, n, d = tokens.shape
    g = tokens.float().reshape(f, n // group, d * group)
    if f < 2:
        return torch.zeros(f * (n // group), dtype=torch.bool)
    step = (g[1:] - g[:-1]).norm(dim=-1)  # (f-1, tokens)
    change = torch.zeros(f, n // group)
    change[1:] = step
    change[:-1] = torch.maximum(change[:-1], step)
    top = change.max()
    if top <= 1e-3 * g.norm(dim=-1).mean():  # nothing moves (a still scene; codec noise aside)
        return torch.zeros(f * (n // group), dtype=torch.bool)
    return (change >= share * top).flatten()


def pointing_loss(attentions: tuple[torch.Tensor, ...], layers: list[int], targets: list[tuple]) -> torch.Tensor | None:
    """Mean over boxes and layers of -log(attention mass on the box's visual tokens)."""
    if not targets:
        return None
    losses = []
    for layer in layers:
        attn = attentions[layer]  # (B, heads, T, T)
        for b, queries, visual, mask in targets:
            a = attn[b][:, queries][:, :, visual].mean(0)  # (queries, visual tokens): mean over heads
            mass = a[:, mask.to(a.device)].sum(-1)
            losses.append(-torch.log(mass.float().clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()
