"""Metrics with the paper's conventions: VQA exact match after normalisation with the
average of per-type accuracies (AA) and overall accuracy (OA); grounding Acc@0.5 from
the first parsed box (unparseable = miss); captioning with the COCO caption evaluation
(pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

`vqa_accuracy`, `acc_at_05` and `cider` are the light fractions (0-1) used during
training; `caption_scores`, `vqa_scores` and `grounding_scores` are the evaluation's,
on the paper's x100 scale.
"""
from __future__ import annotations

import re
import shutil
from collections import defaultdict

from .boxes import first_box_pixels, iou

PAPER_VQA_TYPES = ("presence", "comp", "rural_urban")  # the types the paper averages (no count/area)
# Stands in for a prediction that is empty after tokenisation ("", "..."): given a set whose
# hypotheses are all empty, METEOR's Java process never answers and pycocoevalcap 1.2 blocks
# forever on readline. A word no reference contains scores as an empty answer should (no match).
EMPTY_PREDICTION = "emptyprediction"


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


def _same_length(**lists) -> int:
    """zip() would silently drop the tail of the longer list; refuse instead."""
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    return next(iter(lengths.values()))


# ---- captioning: the COCO caption evaluation ------------------------------------------------

class CaptionScorer:
    """BLEU-1..4 / METEOR / ROUGE-L / CIDEr-D exactly as pycocoevalcap computes them.

    METEOR runs in one Java process that takes ~15 s to load its paraphrase tables, so one
    scorer is meant to serve every captioning benchmark and baseline of an evaluation:
    `with CaptionScorer() as scorer: scorer.score(...)`. `close()` ends the process
    (pycocoevalcap only does so in `__del__`, i.e. whenever the garbage collector gets to it).
    """

    def __init__(self):
        if shutil.which("java") is None:
            raise RuntimeError("captioning metrics need Java: pycocoevalcap's PTB tokenizer and METEOR "
                               "run `java` (not found on PATH); install a JRE, e.g. `apt-get install "
                               "default-jre-headless`")
        from pycocoevalcap.meteor.meteor import Meteor
        self._meteor = Meteor()  # starts loading now; the other scorers are pure Python

    def score(self, preds: list[str], references: list[list[str]]) -> dict[str, float]:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        if _same_length(preds=preds, references=references) == 0:
            raise ValueError("caption_scores: no samples")
        for i, refs in enumerate(references):
            if not any(r.strip() for r in refs):
                raise ValueError(f"caption_scores: sample {i} has no reference caption")
        # whitespace collapsed: a stray '\r' would start a new line in the tokenizer and shift
        # every later caption onto the wrong image
        gts = {i: [{"caption": " ".join(r.split())} for r in refs] for i, refs in enumerate(references)}
        res = {i: [{"caption": " ".join(p.split())}] for i, p in enumerate(preds)}
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        res = {i: [c or EMPTY_PREDICTION for c in caps] for i, caps in res.items()}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        try:
            meteor, _ = self._meteor.compute_score(gts, res)
        except ValueError as err:  # the Java process died: it printed nothing we can parse
            raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) gave no score: {err}") from err
        rouge, _ = Rouge().compute_score(gts, res)
        cider_d, _ = Cider().compute_score(gts, res)
        scores = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
        scores.update(meteor=meteor, rouge_l=rouge, cider=cider_d)
        return {k: 100 * float(v) for k, v in scores.items()}

    def close(self) -> None:
        proc = self._meteor.meteor_p
        with self._meteor.lock:  # never kill it halfway through an answer
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
            proc.kill()
            proc.wait()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def caption_scores(preds: list[str], references: list[list[str]]) -> dict[str, float]:
    """`bleu_1..bleu_4, meteor, rouge_l, cider` (x100) of `preds` against all references of each
    sample. Starts and ends its own METEOR process; use `CaptionScorer` to score several sets."""
    with CaptionScorer() as scorer:
        return scorer.score(preds, references)


# ---- VQA and grounding on the paper's scale ------------------------------------------------

def vqa_scores(preds: list[str], answers: list[str], types: list[str],
               paper_types: tuple[str, ...] = PAPER_VQA_TYPES) -> dict[str, float]:
    """x100: `acc_<type>` for every type present; `aa` = mean over the paper's types present (all
    types if none is), `aa_all` = mean over every type, `oa` = overall accuracy."""
    if _same_length(preds=preds, answers=answers, types=types) == 0:
        raise ValueError("vqa_scores: no samples")
    missing = [i for i, t in enumerate(types) if not t]
    if missing:  # a lost type would silently move AA (types are very unbalanced)
        raise ValueError(f"vqa_scores: question type missing for samples {missing[:10]}")
    acc = vqa_accuracy(preds, answers, types)
    per_type = {k.removeprefix("acc_"): v for k, v in acc.items() if k.startswith("acc_")}
    reported = [t for t in paper_types if t in per_type] or list(per_type)
    out = {f"acc_{t}": 100 * v for t, v in per_type.items()}
    out["aa"] = 100 * sum(per_type[t] for t in reported) / len(reported)
    out["aa_all"] = 100 * acc["aa"]
    out["oa"] = 100 * acc["oa"]
    return out


def grounding_scores(preds: list[str], boxes: list[tuple[float, float, float, float]],
                     sizes: list[tuple[int, int]]) -> dict[str, float]:
    """x100: `acc_at_0.5` (IoU > 0.5 with the first parsed box; unparseable = miss), `parsed`
    (share of answers holding a box) and `mean_iou` (unparseable counts as 0)."""
    n = _same_length(preds=preds, boxes=boxes, sizes=sizes)
    if n == 0:
        raise ValueError("grounding_scores: no samples")
    ious, parsed = [], 0
    for text, gt, (w, h) in zip(preds, boxes, sizes):
        box = first_box_pixels(text, w, h)
        parsed += box is not None
        ious.append(iou(box, gt) if box is not None else 0.0)
    return {"acc_at_0.5": 100 * sum(v > 0.5 for v in ious) / n,
            "parsed": 100 * parsed / n, "mean_iou": 100 * sum(ious) / n}
