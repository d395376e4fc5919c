"""Where does grounding fail? Probes a saved SkyEyeGPT on `[refer]` samples with the
answer given (teacher forcing), and prints JSON:

- `mae_teacher_forced`: the model's own coordinate error (grid units, x1 y1 x2 y2) when
  the earlier coordinates are the true ones; `mae_mean_box` is the error of always
  answering the mean training box.
- `attention_on_object`: per decoder layer, the attention mass (mean over heads) that the
  positions writing a coordinate put on the visual tokens overlapping the box;
  `attention_uniform` is what spreading it evenly would give.
- `probe_visual_tokens`: error of a ridge regression from the mean embedding of those
  visual tokens to the box, i.e. what perfect attention could read linearly.
- `probe_hidden_L<k>`: error of a ridge regression from layer k's hidden state at each
  coordinate-writing position to that coordinate.
- `ceiling_group<g>`: the grounding a perfect, linear reader could reach from the frozen
  encoder's patches grouped `g` at a time, as the alignment layer groups them: a ridge
  regression to the box from each visual token holding a patch whose centre lies in the box; a test box is the
  mean of its tokens' predictions, scored as the benchmark scores (Acc@0.5, and the mean
  error in grid units). Below a target, stage 1 cannot reach it by attending and reading
  linearly, however long it trains; `acc_at_0.5_mean_box` is always answering the mean box.
Probes are fit on DIOR-RSVG train samples and scored on test samples.

    python bench/grounding_probe.py --model <saved model folder> [--data data/instructions] [--groups 1,4]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skyeye.data.items import load_items
from skyeye.formats.boxes import GRID, box_text, iou
from skyeye.model.skyeyegpt import load_model
from skyeye.model.template import collate, encode_conversation
from skyeye.model.tokenizer import grid_lookup
from skyeye.training.pointing import PointingTargets, overlapping, token_regions


def rows_of(root: Path, n_train: int, n_test: int) -> list[tuple[str, str, str, Path]]:
    """(split, question, answer box, image path) for DIOR-RSVG refer samples."""
    train = [it for it in load_items(root / "stage1.json") if it.task == "refer" and it.source == "dior_rsvg"]
    rows = [("train", it.turns[0][0], it.turns[0][1], root / it.media) for it in train[:n_train]]
    test = json.loads((root / "eval" / "dior_rsvg_test.json").read_text())["samples"]
    for r in test[:: max(1, len(test) // n_test)][:n_test]:
        rows.append(("test", r["prompt"], box_text(r["box"], *r["image_size"]), root / "eval" / r["image"]))
    return rows


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Weights (D + 1, K) of a ridge regression with a bias column; apply with `with_bias(x) @ w`."""
    xa = with_bias(x)
    return np.linalg.solve(xa.T @ xa + lam * np.eye(xa.shape[1]), xa.T @ y)


def with_bias(x: np.ndarray) -> np.ndarray:
    return np.c_[x, np.ones(len(x))]


def ridge_mae(x: np.ndarray, y: np.ndarray, train: np.ndarray, lam: float) -> np.ndarray:
    w = ridge_fit(x[train], y[train], lam)
    return np.abs(with_bias(x[~train]) @ w - y[~train]).mean(0)


def object_tokens(p: int, group: int, box) -> np.ndarray:
    """(p // group,) bool: the visual tokens holding a patch whose centre lies in the box (grid
    units), as the encoder's dense targets label patches; else the one holding the box centre."""
    side = math.isqrt(p)
    cell = GRID / side
    cx, cy = (np.arange(p) % side + 0.5) * cell, (np.arange(p) // side + 0.5) * cell
    inside = (cx >= box[0]) & (cx <= box[2]) & (cy >= box[1]) & (cy <= box[3])
    if not inside.any():  # a small object: the patch holding its centre
        row, col = (min(int((box[k] + box[k + 2]) / 2 // cell), side - 1) for k in (1, 0))
        inside[row * side + col] = True
    return inside.reshape(p // group, group).any(1)


def ceiling(patches: np.ndarray, boxes: np.ndarray, train: np.ndarray, group: int, lam: float = 1.0) -> dict:
    """Perfect attention, linear read-out, for (N, P, D) encoder patches grouped `group` at a
    time and (N, 4) boxes in grid units: Acc@0.5 and mean error on the samples not in `train`."""
    n, p, d = patches.shape
    if p % group:
        raise ValueError(f"{p} patches do not split into groups of {group}")
    tokens = patches.reshape(n, p // group, d * group)  # consecutive patches, as the alignment layer
    on = [object_tokens(p, group, b) for b in boxes]
    fit = np.flatnonzero(train)
    x = np.concatenate([tokens[i][on[i]] for i in fit])
    y = np.concatenate([np.repeat(boxes[i][None], on[i].sum(), 0) for i in fit])
    w = ridge_fit(x, y, lam)
    test = np.flatnonzero(~train)
    pred = np.array([(with_bias(tokens[i][on[i]]) @ w).mean(0) for i in test])
    return {"visual_tokens": p // group,
            "acc_at_0.5": round(float(np.mean([iou(a, b) >= 0.5 for a, b in zip(pred, boxes[test], strict=True)])), 3),
            "mae": round(float(np.abs(pred - boxes[test]).mean()), 2)}


@torch.no_grad()
def probe(model_dir: str, root: Path, n_train: int, n_test: int, groups: tuple[int, ...] = (1, 4)) -> dict:
    m = load_model(model_dir).eval()
    m.llm.set_attn_implementation("eager")  # attention weights are needed
    tok, n_vis = m.tokenizer, m.visual_tokens_per_image()
    grid_ids, value_of = grid_lookup(tok)
    regions = token_regions(n_vis, m.cfg.alignment.group)
    # the same box finder as the pointing loss: answer boxes, the positions that write them, their tokens
    targets_of = PointingTargets(tok, m.image_token_id, n_vis, m.cfg.alignment.group)
    split, boxes, own, visual, mass, hidden, patches = [], [], [], [], [], {}, []
    rows = rows_of(root, n_train, n_test)
    for i in range(0, len(rows), 32):
        chunk = rows[i:i + 32]
        batch = collate([encode_conversation(tok, [(q, a)], n_vis) for _, q, a, _ in chunk], tok.pad_token_id)
        encoded = m.vision(m.preprocess([Image.open(p) for *_, p in chunk]))  # the frozen encoder, once
        tokens = m.alignment_layer(encoded)  # (B, n_vis, H): what the LLM receives
        out = m(batch["input_ids"], batch["attention_mask"], vision_tokens=encoded, output_attentions=True,
                output_hidden_states=True)
        for r, queries, vis, on in targets_of(batch["input_ids"], batch["labels"], [1] * len(chunk)):
            split.append(chunk[r][0])
            boxes.append(value_of[batch["labels"][r, queries + 1]].numpy())  # logits at q predict q+1
            own.append(out.logits[r, queries][:, grid_ids].argmax(-1).numpy())
            visual.append(tokens[r][on].mean(0).numpy())
            patches.append(encoded[r].numpy())
            mass.append([a[r][:, queries][:, :, vis].mean(0)[:, on].sum(-1).mean().item() for a in out.attentions])
            for k, h in enumerate(out.hidden_states):
                hidden.setdefault(k, []).append(h[r, queries].numpy())
    y, train = np.array(boxes, float), np.array(split) == "train"
    uniform = np.mean([overlapping(regions, tuple(b)).float().mean().item() for b in y[~train].astype(int)])
    res = {"model": model_dir, "n_train": int(train.sum()), "n_test": int((~train).sum()),
           "visual_tokens": n_vis, "alignment_group": m.cfg.alignment.group,
           "mae_mean_box": np.abs(y[~train] - y[train].mean(0)).mean(0).round(1).tolist(),
           "mae_teacher_forced": np.abs(np.array(own)[~train] - y[~train]).mean(0).round(1).tolist(),
           "attention_on_object": np.array(mass)[~train].mean(0).round(3).tolist(),
           "attention_uniform": round(float(uniform), 3),
           "probe_visual_tokens": ridge_mae(np.array(visual), y, train, 1.0).round(1).tolist()}
    mean_box = y[train].mean(0)
    res["acc_at_0.5_mean_box"] = round(float(np.mean([iou(mean_box, b) >= 0.5 for b in y[~train]])), 3)
    patches = np.stack(patches)
    for g in groups:
        res[f"ceiling_group{g}"] = ceiling(patches, y, train, g)
    for k, hs in hidden.items():
        h = np.stack(hs)  # (N, 4, H)
        res[f"probe_hidden_L{k}"] = [round(float(ridge_mae(h[:, c], y[:, c:c + 1], train, 10.0)[0]), 1)
                                     for c in range(4)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="saved SkyEyeGPT folder (a stage checkpoint)")
    ap.add_argument("--data", default="data/instructions", help="instruction folder")
    ap.add_argument("--train", type=int, default=600, help="DIOR-RSVG train samples to fit the probes on")
    ap.add_argument("--test", type=int, default=200, help="DIOR-RSVG test samples to score them on")
    ap.add_argument("--groups", default="1,4", help="patch groupings to find the linear ceiling of (comma list)")
    args = ap.parse_args()
    groups = tuple(int(g) for g in args.groups.split(","))
    print(json.dumps(probe(args.model, Path(args.data), args.train, args.test, groups), indent=1))


if __name__ == "__main__":
    main()
