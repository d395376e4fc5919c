"""Metrics with the paper's conventions: VQA exact match after normalisation with the
average of per-type accuracies (AA) and overall accuracy (OA); grounding Acc@0.5 from
the first parsed box (unparseable = miss); captioning CIDEr with pycocoevalcap.

(The full 8-benchmark evaluation adds BLEU/METEOR/ROUGE-L with the PTB tokenizer.)
"""
from __future__ import annotations

import re
from collections import defaultdict

from .boxes import first_box_pixels, iou


def normalise_answer(text: str) -> str:
    return re.sub(r"[\s.?!,;:]+$", "", text.strip().lower())


def vqa_accuracy(preds: list[str], answers: list[str], types: list[str]) -> dict[str, float]:
    """Per-type accuracy, AA (mean of types, the paper's headline) and OA."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, a, t in zip(preds, answers, types):
        hits[t].append(normalise_answer(p) == normalise_answer(a))
    per_type = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    total = [h for hs in hits.values() for h in hs]
    return {**{f"acc_{t}": v for t, v in per_type.items()},
            "aa": sum(per_type.values()) / max(len(per_type), 1), "oa": sum(total) / max(len(total), 1)}


def acc_at_05(preds: list[str], boxes: list[tuple[float, float, float, float]],
              sizes: list[tuple[int, int]]) -> float:
    """Share of answers whose first box has IoU > 0.5 with the ground truth."""
    hits = 0
    for text, gt, (w, h) in zip(preds, boxes, sizes):
        box = first_box_pixels(text, w, h)
        hits += box is not None and iou(box, gt) > 0.5
    return hits / max(len(preds), 1)


def simple_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider(preds: list[str], references: list[list[str]]) -> float:
    """CIDEr-D (pycocoevalcap) on lower-cased word tokens; no Java needed."""
    from pycocoevalcap.cider.cider import Cider
    gts = {i: [simple_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokens(p) or "empty"] for i, p in enumerate(preds)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
