"""Validation samples scored during training, next to the trivial baselines, so the
per-task learning curves (and whether the model beats answering blindly) show in MLflow.

Read from the instruction folder's `validation/` files only: the test splits under `eval/`
are sealed until the evaluation (`StageConfig` refuses a config that names one, and
`skyeye.training.sealed` refuses to open one while a stage trains). Scored with the
evaluation's metrics and baselines (`skyeye.evaluation.metrics`, `skyeye.evaluation.baselines`)
and named like the evaluation's metrics behind the prefix `validation/`:
`validation/dior_rsvg_val/acc_at_0.5`, `validation/baseline.centred_box/dior_rsvg_val/acc_at_0.5`.
Captions are scored by CIDEr without METEOR (its Java process takes ~15 s to start).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..data.instructions import class_words, count_phrase
from ..data.items import Item, load_items
from ..evaluation.baselines import TRIVIAL, centred_boxes, majority_answers, trivial_answers
from ..evaluation.metrics import caption_scores, grounding_scores, normalise_answer, vqa_scores
from ..formats import prompts
from ..formats.benchmarks import ACC_AT_05, CIDER, VALIDATION, metric, spread
from ..synth.scene import CATEGORIES
from .stage_config import ValidationConfig

CONVERSATION = "conversation"  # the key of the stage-2 three-turn conversations in metric names


def _score(task: str, rows: list[dict], answers: list[str]) -> dict[str, float]:
    if task == "grounding":
        return grounding_scores(answers, [tuple(r["box"]) for r in rows], [tuple(r["image_size"]) for r in rows])
    if task == "vqa":
        return vqa_scores(answers, [r["answer"] for r in rows], [r["question_type"] for r in rows])
    return caption_scores(answers, [r["references"] for r in rows], meteor=False)


class Validation:
    def __init__(self, cfg: ValidationConfig, root: Path, model, features):
        self.cfg, self.root, self.model, self.features = cfg, Path(root), model, features
        self.sets: dict[str, tuple[str, dict, list]] = {}  # task -> (bench split, eval file, rows)
        for task in ("grounding", "vqa", "caption"):
            rel = getattr(cfg, task)
            if rel and (self.root / rel).exists():
                ev = json.loads((self.root / rel).read_text())
                self.sets[task] = (f"{ev['benchmark']}_{ev['split']}", ev, spread(ev["samples"], cfg.samples))
        # the baselines' training set is stage 1's, in both stages, as in the evaluation
        stage1 = self.root / "stage1.json"
        self.train: list[Item] = load_items(stage1) if stage1.exists() else []
        self.baselines = self._baselines()

    def _media(self, rel_file: str, row: dict) -> tuple[str, int]:
        # sample paths are relative to their file's folder; make them relative to the instruction root
        media = str(Path(rel_file).parent / (row.get("image") or row["video"]))
        return media, int(row.get("frames", 1)) if "video" in row else 1

    def _baselines(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for task, (key, ev, rows) in self.sets.items():
            eval_root = self.root / Path(getattr(self.cfg, task)).parent
            name, answers = trivial_answers(task, rows, eval_root, self.train, self.root, ev["benchmark"])
            out |= {VALIDATION + metric(key, m, name): v for m, v in _score(task, rows, answers).items()}
        return out

    def answers(self, task: str, batch: int = 32) -> list[str]:
        _, _, rows = self.sets[task]
        rel = getattr(self.cfg, task)
        out: list[str] = []
        for i in range(0, len(rows), batch):
            keys = [self._media(rel, r) for r in rows[i:i + batch]]
            vis, frames = self.features.batch(keys)
            with torch.no_grad():
                out += self.model.ask([r["prompt"] for r in rows[i:i + batch]], frames, vision_tokens=vis,
                                      max_new_tokens=24)
        return out

    # ------------------------------------------------------------ stage 2: three-turn conversations
    def _conversations(self) -> list[dict]:
        """Per validation image: the object list (derived from its annotations), a [vqa] count, a [refer]."""
        ev = json.loads((self.root / self.cfg.conversation).read_text())
        by_image: dict[str, list[dict]] = defaultdict(list)
        for r in ev["samples"]:
            by_image[r["image"]].append(r)
        convs = []
        for image, rows in sorted(by_image.items()):
            words = Counter(_class_of(r["expression"]) for r in rows)
            if None in words:
                continue
            scene = " and ".join(count_phrase(c, n) for c, n in sorted(words.items()))
            cls = sorted(words)[0]
            target = rows[len(convs) % len(rows)]
            convs.append({"image": image, "row": target, "turns": [
                (f"[caption] {prompts.first('inventory')}", f"there are {scene} in the image."),
                (f"[vqa] how many {class_words(cls)[1]} are there?", str(words[cls])),
                (f"[refer] {target['expression']}", None)]})
        return spread(convs, self.cfg.samples)

    def conversation_scores(self) -> dict[str, float]:
        if not hasattr(self, "_convs"):
            self._convs = self._conversations()
        convs, rel = self._convs, self.cfg.conversation
        history: list[list[tuple[str, str]]] = [[] for _ in convs]
        answers: list[list[str]] = [[] for _ in convs]
        for turn in range(3):
            for i in range(0, len(convs), 32):
                chunk = list(range(i, min(i + 32, len(convs))))
                vis, frames = self.features.batch([self._media(rel, convs[j]["row"]) for j in chunk])
                with torch.no_grad():
                    out = self.model.ask([convs[j]["turns"][turn][0] for j in chunk], frames, vision_tokens=vis,
                                         histories=[history[j] for j in chunk], max_new_tokens=24)
                for j, a in zip(chunk, out, strict=True):  # the model's own answers become the history
                    history[j].append((convs[j]["turns"][turn][0], a))
                    answers[j].append(a)
        lists = [{"question_type": "object list", "answer": c["turns"][0][1]} for c in convs]
        counts = [{"question_type": "count", "answer": c["turns"][1][1]} for c in convs]
        rows = [c["row"] for c in convs]
        gt, sizes = [tuple(r["box"]) for r in rows], [tuple(r["image_size"]) for r in rows]
        source = json.loads((self.root / rel).read_text())["benchmark"]

        def count_acc(preds: list[str]) -> float:
            hits = sum(normalise_answer(p) == c["answer"] for p, c in zip(preds, counts, strict=True))
            return 100 * hits / len(convs)

        def name(what: str, baseline: str | None = None) -> str:
            return VALIDATION + metric(CONVERSATION, what, baseline)

        refs = [[c["answer"]] for c in lists]
        return {name(f"turn1_{CIDER}"): caption_scores([a[0] for a in answers], refs, meteor=False)[CIDER],
                name(f"turn1_{CIDER}", TRIVIAL["vqa"]): caption_scores(majority_answers(lists), refs,
                                                                           meteor=False)[CIDER],
                name("turn2_acc"): count_acc([a[1] for a in answers]),
                name("turn2_acc", TRIVIAL["vqa"]): count_acc(majority_answers(counts)),
                name(f"turn3_{ACC_AT_05}"): grounding_scores([a[2] for a in answers], gt, sizes)[ACC_AT_05],
                name(f"turn3_{ACC_AT_05}", TRIVIAL["grounding"]): grounding_scores(
                    centred_boxes(rows, self.train, source), gt, sizes)[ACC_AT_05]}

    def score(self) -> dict[str, float]:
        m: dict[str, float] = dict(self.baselines)
        for task, (key, _, rows) in self.sets.items():
            m |= {VALIDATION + metric(key, name): v for name, v in _score(task, rows, self.answers(task)).items()}
        if self.cfg.conversation and (self.root / self.cfg.conversation).exists():
            m |= self.conversation_scores()
        return m


def _class_of(expression: str) -> str | None:
    """The SkyEye-Synth category named in a referring expression (None for other vocabularies)."""
    text = expression.lower()
    return next((c for c in sorted(CATEGORIES, key=len, reverse=True) if c in text), None)
