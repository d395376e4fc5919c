"""Metrics with the paper's conventions, one implementation each, on the paper's x100
scale: VQA exact match after normalisation with the average of per-type accuracies (AA)
and overall accuracy (OA); grounding Acc@0.5 from the first parsed box (unparseable =
miss); captioning with the COCO caption evaluation (pycocoevalcap: PTB tokenizer,
BLEU-1..4, METEOR, ROUGE-L, CIDEr-D). The evaluation and training's held-out scores
both call these, so a metric name means one thing everywhere.
"""
from __future__ import annotations

import re
import shutil
from collections import defaultdict

from .benchmarks import AA, AA_ALL, ACC_AT_05, OA, PAPER_VQA_TYPES
from .boxes import first_box_pixels, iou

# Stands in for a prediction that is empty after tokenisation ("", "..."): given a set whose
# hypotheses are all empty, METEOR's Java process never answers and pycocoevalcap 1.2 blocks
# forever on readline. A word no reference contains scores as an empty answer should (no match).
EMPTY_PREDICTION = "emptyprediction"


def normalise_answer(text: str) -> str:
    return re.sub(r"[\s.?!,;:]+$", "", text.strip().lower())


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

    def __init__(self, meteor: bool = True):
        if shutil.which("java") is None:
            raise RuntimeError("captioning metrics need Java: pycocoevalcap's PTB tokenizer and METEOR "
                               "run `java` (not found on PATH); install a JRE, e.g. `apt-get install "
                               "default-jre-headless`")
        self._meteor = None
        if meteor:  # its Java process takes ~15 s to start; CIDEr alone (held-out scores) needs none
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
        scores = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
        if self._meteor is not None:
            try:
                scores["meteor"], _ = self._meteor.compute_score(gts, res)
            except ValueError as err:  # the Java process died: it printed nothing we can parse
                raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) gave no score: {err}") from err
        scores["rouge_l"], _ = Rouge().compute_score(gts, res)
        scores["cider"], _ = Cider().compute_score(gts, res)
        return {k: 100 * float(v) for k, v in scores.items()}

    def close(self) -> None:
        if self._meteor is None:
            return
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


def caption_scores(preds: list[str], references: list[list[str]], meteor: bool = True) -> dict[str, float]:
    """`bleu_1..bleu_4, meteor, rouge_l, cider` (x100) of `preds` against all references of each
    sample (`meteor=False`: all but METEOR, without its Java process). Starts and ends its own
    METEOR process; use `CaptionScorer` to score several sets."""
    with CaptionScorer(meteor) as scorer:
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
    hits: dict[str, list[bool]] = defaultdict(list)
    for p, a, t in zip(preds, answers, types, strict=True):
        hits[t].append(normalise_answer(p) == normalise_answer(a))
    per_type = {t: 100 * sum(h) / len(h) for t, h in sorted(hits.items())}
    reported = [t for t in paper_types if t in per_type] or list(per_type)
    out = {f"acc_{t}": v for t, v in per_type.items()}
    out[AA] = sum(per_type[t] for t in reported) / len(reported)
    out[AA_ALL] = sum(per_type.values()) / len(per_type)
    out[OA] = 100 * sum(h for hs in hits.values() for h in hs) / len(preds)
    return out


def grounding_scores(preds: list[str], boxes: list[tuple[float, float, float, float]],
                     sizes: list[tuple[int, int]]) -> dict[str, float]:
    """x100: `acc_at_0.5` (IoU > 0.5 with the first parsed box; unparseable = miss), `parsed`
    (share of answers holding a box) and `mean_iou` (unparseable counts as 0)."""
    n = _same_length(preds=preds, boxes=boxes, sizes=sizes)
    if n == 0:
        raise ValueError("grounding_scores: no samples")
    ious, parsed = [], 0
    for text, gt, (w, h) in zip(preds, boxes, sizes, strict=True):
        box = first_box_pixels(text, w, h)
        parsed += box is not None
        ious.append(iou(box, gt) if box is not None else 0.0)
    return {ACC_AT_05: 100 * sum(v > 0.5 for v in ious) / n,
            "parsed": 100 * parsed / n, "mean_iou": 100 * sum(ious) / n}
