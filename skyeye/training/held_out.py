"""Held-back test samples scored during training, next to trivial baselines, so the
per-task learning curves (and whether the model beats answering blindly) show in MLflow."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from .. import prompts
from ..boxes import box_text
from ..metrics import acc_at_05, cider, normalise_answer, vqa_accuracy
from ..synth.scene import PLURAL
from .stage_config import HeldOutConfig


def _spread(rows: list, n: int) -> list:
    """`n` rows spread evenly over the file (deterministic, covers every image group)."""
    if len(rows) <= n:
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round()]


class HeldOut:
    def __init__(self, cfg: HeldOutConfig, root: Path, train_items, model, features):
        self.cfg, self.root, self.model, self.features = cfg, Path(root), model, features
        self.sets: dict[str, tuple[dict, list]] = {}
        for task in ("grounding", "vqa", "caption"):
            rel = getattr(cfg, task)
            if rel and (self.root / rel).exists():
                ev = json.loads((self.root / rel).read_text())
                self.sets[task] = (ev, _spread(ev["samples"], cfg.samples))
        self.baselines = self._baselines(train_items)

    def _media(self, rel_file: str, row: dict) -> tuple[str, int]:
        # eval paths are relative to the eval file's folder; make them relative to the instruction root
        media = str(Path(rel_file).parent / (row.get("image") or row["video"]))
        return media, int(row.get("frames", 1)) if "video" in row else 1

    def _baselines(self, train_items) -> dict[str, float]:
        out: dict[str, float] = {}
        if "grounding" in self.sets:  # a centred box of the mean training-box size
            _, rows = self.sets["grounding"]
            preds = []
            for r in rows:
                w, h = r["image_size"]
                preds.append(box_text((w * 0.35, h * 0.35, w * 0.65, h * 0.65), w, h))
            out["baseline/grounding_acc05"] = acc_at_05(preds, [tuple(r["box"]) for r in rows],
                                                        [tuple(r["image_size"]) for r in rows])
        if "vqa" in self.sets:  # each type's most frequent answer (counted on the test file: a generous baseline)
            _, rows = self.sets["vqa"]
            all_rows = self.sets["vqa"][0]["samples"]
            by_type: dict[str, Counter] = defaultdict(Counter)
            for r in all_rows:
                by_type[r["question_type"]][r["answer"]] += 1
            preds = [by_type[r["question_type"]].most_common(1)[0][0] for r in rows]
            out["baseline/vqa_aa"] = vqa_accuracy(preds, [r["answer"] for r in rows],
                                                  [r["question_type"] for r in rows])["aa"]
        if "caption" in self.sets:  # the most common training caption of that source
            ev, rows = self.sets["caption"]
            common = Counter(a for it in train_items if it.source == ev["benchmark"]  # stage-2 turns count too
                             for q, a in it.turns if q.startswith("[caption]")).most_common(1)
            text = common[0][0] if common else ""
            out["baseline/caption_cider"] = cider([text] * len(rows), [r["references"] for r in rows])
        return out

    def answers(self, task: str, prompts: list[str] | None = None, batch: int = 32) -> list[str]:
        ev, rows = self.sets[task]
        rel = getattr(self.cfg, task)
        out: list[str] = []
        for i in range(0, len(rows), batch):
            keys = [self._media(rel, r) for r in rows[i:i + batch]]
            qs = prompts[i:i + batch] if prompts else [r["prompt"] for r in rows[i:i + batch]]
            vis, frames = self.features.batch(keys)
            with torch.no_grad():
                out += self.model.ask(qs, frames, vision_tokens=vis, max_new_tokens=24)
        return out

    # ------------------------------------------------------------ stage 2: three-turn conversations
    def _conversations(self) -> list[dict]:
        """Per test image: [caption] (derived from its annotations), [vqa] count, [refer]."""
        rel = self.cfg.conversation
        ev = json.loads((self.root / rel).read_text())
        by_image: dict[str, list[dict]] = defaultdict(list)
        for r in ev["samples"]:
            by_image[r["image"]].append(r)
        convs = []
        for image, rows in sorted(by_image.items()):
            words = Counter(_class_of(r["expression"]) for r in rows)
            if None in words:
                continue
            scene = " and ".join(_phrase(c, n) for c, n in sorted(words.items()))
            cls = sorted(words)[0]
            target = rows[len(convs) % len(rows)]
            convs.append({"image": image, "row": target, "turns": [
                (f"[caption] {prompts.first('inventory')}", f"there are {scene} in the image."),
                (f"[vqa] how many {PLURAL[cls]} are there?", str(words[cls])),
                (f"[refer] {target['expression']}", None)]})
        return _spread(convs, self.cfg.samples)

    def conversation_scores(self) -> dict[str, float]:
        convs = self._convs if hasattr(self, "_convs") else self._conversations()
        self._convs = convs
        rel = self.cfg.conversation
        history: list[list[tuple[str, str]]] = [[] for _ in convs]
        answers: list[list[str]] = [[] for _ in convs]
        for turn in range(3):
            for i in range(0, len(convs), 32):
                chunk = list(range(i, min(i + 32, len(convs))))
                vis, frames = self.features.batch([self._media(rel, convs[j]["row"]) for j in chunk])
                with torch.no_grad():
                    out = self.model.ask([convs[j]["turns"][turn][0] for j in chunk], frames, vision_tokens=vis,
                                         histories=[history[j] for j in chunk], max_new_tokens=24)
                for j, a in zip(chunk, out):  # the model's own answers become the history
                    history[j].append((convs[j]["turns"][turn][0], a))
                    answers[j].append(a)
        caps = [a[0] for a in answers]
        refs = [[c["turns"][0][1]] for c in convs]
        counts = [c["turns"][1][1] for c in convs]
        majority = Counter(counts).most_common(1)[0][0]
        common_caption = Counter(r[0] for r in refs).most_common(1)[0][0]
        rows = [c["row"] for c in convs]
        gt = [tuple(r["box"]) for r in rows]
        sizes = [tuple(r["image_size"]) for r in rows]
        centred = [box_text((w * 0.35, h * 0.35, w * 0.65, h * 0.65), w, h) for w, h in sizes]
        return {"heldout/conv_turn1_caption_cider": cider(caps, refs),
                "baseline/conv_turn1_caption_cider": cider([common_caption] * len(refs), refs),
                "heldout/conv_turn2_count_acc": sum(normalise_answer(a[1]) == c for a, c in zip(answers, counts)) / len(convs),
                "baseline/conv_turn2_count_acc": sum(majority == c for c in counts) / len(convs),
                "heldout/conv_turn3_refer_acc05": acc_at_05([a[2] for a in answers], gt, sizes),
                "baseline/conv_turn3_refer_acc05": acc_at_05(centred, gt, sizes)}

    def score(self) -> dict[str, float]:
        m: dict[str, float] = dict(self.baselines)
        if "grounding" in self.sets:
            _, rows = self.sets["grounding"]
            m["heldout/grounding_acc05"] = acc_at_05(self.answers("grounding"), [tuple(r["box"]) for r in rows],
                                                     [tuple(r["image_size"]) for r in rows])
        if "vqa" in self.sets:
            _, rows = self.sets["vqa"]
            acc = vqa_accuracy(self.answers("vqa"), [r["answer"] for r in rows], [r["question_type"] for r in rows])
            m |= {f"heldout/vqa_{k}": v for k, v in acc.items()}
        if "caption" in self.sets:
            _, rows = self.sets["caption"]
            m["heldout/caption_cider"] = cider(self.answers("caption"), [r["references"] for r in rows])
        if self.cfg.conversation and (self.root / self.cfg.conversation).exists():
            m |= self.conversation_scores()
        return m


def _class_of(expression: str) -> str | None:
    """The category named in a referring expression (the synth's and DIOR's vocabulary)."""
    text = expression.lower()
    return next((c for c in sorted(PLURAL, key=len, reverse=True) if c in text), None)


def _phrase(cls: str, n: int) -> str:
    words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return f"{words[n] if n < len(words) else n} {cls if n == 1 else PLURAL[cls]}"

