"""Metrics with the paper's conventions, one implementation each, on the paper's x100
scale: VQA exact match after normalisation with the average of per-type accuracies (AA)
and overall accuracy (OA); grounding Acc@0.5 from the first parsed box (unparseable =
miss); captioning with the COCO caption evaluation (pycocoevalcap: PTB tokenizer,
BLEU-1..4, METEOR, ROUGE-L, CIDEr-D). The evaluation and training's validation scores
both call these, so a metric name means one thing everywhere. Each scorer has an `*_items`
twin that returns, from the same pass, each item's statistics beside the scores: an `ItemStats`
for the bootstrap intervals of `skyeye.evaluation.intervals`.
"""
from __future__ import annotations

# imports inside functions: pycocoevalcap (0.4 s to import) loads only when captions are scored
import re
import shutil
from collections import defaultdict

from ..formats.benchmarks import AA, AA_ALL, ACC_AT_05, OA, PAPER_VQA_TYPES
from ..formats.boxes import first_box_pixels, iou
from .intervals import BLEU_N, TYPE_PREFIX, ItemStats

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


def _ids(ids: list | None, n: int) -> list:
    """The items' ids, their row numbers when none are given."""
    if ids is None:
        return list(range(n))
    _same_length(ids=ids, predictions=range(n))
    return list(ids)


# ---- captioning: the COCO caption evaluation ------------------------------------------------

def tokenised(preds: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """(references, predictions) as the COCO scorers take them, `{row: [caption, ...]}`, after
    the PTB tokenizer; an empty prediction becomes EMPTY_PREDICTION."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    n = _same_length(preds=preds, references=references)
    if n == 0:
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
    # in row order, so that every scorer's per-item array lines up with the ids
    return {i: gts[i] for i in range(n)}, {i: [c or EMPTY_PREDICTION for c in res[i]] for i in range(n)}


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
        if meteor:  # its Java process takes ~15 s to start; CIDEr alone (validation scores) needs none
            from pycocoevalcap.meteor.meteor import Meteor
            self._meteor = Meteor()  # starts loading now; the other scorers are pure Python

    def score(self, preds: list[str], references: list[list[str]]) -> dict[str, float]:
        return self.score_items(preds, references).scores

    def score_items(self, preds: list[str], references: list[list[str]], ids: list | None = None) -> ItemStats:
        """The scores and each item's statistics (for bootstrap intervals) from one scoring pass."""
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        gts, res = tokenised(preds, references)
        ids = _ids(ids, len(preds))
        # what `Bleu(4).compute_score` does, keeping the scorer to read each item's counts from
        bleu_scorer = BleuScorer(n=BLEU_N)
        for i in gts:
            bleu_scorer += (res[i][0], gts[i])
        bleu, _ = bleu_scorer.compute_score(option="closest", verbose=0)
        scores = {f"bleu_{n + 1}": b for n, b in enumerate(bleu)}
        cooked = bleu_scorer.ctest
        columns = {"bleu_testlen": [c["testlen"] for c in cooked],
                   # pycocoevalcap's own pick of each item's closest reference length
                   "bleu_reflen": [bleu_scorer._single_reflen(c["reflen"], "closest", c["testlen"]) for c in cooked],
                   "bleu_guess": [c["guess"] for c in cooked], "bleu_correct": [c["correct"] for c in cooked]}
        if self._meteor is not None:
            try:
                scores["meteor"], columns["meteor"] = self._meteor.compute_score(gts, res)
            except ValueError as err:  # the Java process died: it printed nothing we can parse
                raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) gave no score: {err}") from err
        scores["rouge_l"], columns["rouge_l"] = Rouge().compute_score(gts, res)
        scores["cider"], columns["cider"] = Cider().compute_score(gts, res)
        return ItemStats("caption", ids, columns, {k: 100 * float(v) for k, v in scores.items()})

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
    return caption_items(preds, references, meteor).scores


def caption_items(preds: list[str], references: list[list[str]], meteor: bool = True,
                  ids: list | None = None) -> ItemStats:
    """`caption_scores` with each item's statistics, for bootstrap intervals."""
    with CaptionScorer(meteor) as scorer:
        return scorer.score_items(preds, references, ids)


# ---- VQA and grounding on the paper's scale ------------------------------------------------

def vqa_scores(preds: list[str], answers: list[str], types: list[str],
               paper_types: tuple[str, ...] = PAPER_VQA_TYPES) -> dict[str, float]:
    """x100: `acc_<type>` for every type present; `aa` = mean over the paper's types present (all
    types if none is), `aa_all` = mean over every type, `oa` = overall accuracy."""
    return vqa_items(preds, answers, types, paper_types).scores


def vqa_items(preds: list[str], answers: list[str], types: list[str],
              paper_types: tuple[str, ...] = PAPER_VQA_TYPES, ids: list | None = None) -> ItemStats:
    """`vqa_scores` with each item's hit and question type, for bootstrap intervals."""
    if _same_length(preds=preds, answers=answers, types=types) == 0:
        raise ValueError("vqa_scores: no samples")
    missing = [i for i, t in enumerate(types) if not t]
    if missing:  # a lost type would silently move AA (types are very unbalanced)
        raise ValueError(f"vqa_scores: question type missing for samples {missing[:10]}")
    ids = _ids(ids, len(preds))
    item_hits = [normalise_answer(p) == normalise_answer(a) for p, a in zip(preds, answers, strict=True)]
    hits: dict[str, list[bool]] = defaultdict(list)
    for h, t in zip(item_hits, types, strict=True):
        hits[t].append(h)
    per_type = {t: 100 * sum(h) / len(h) for t, h in sorted(hits.items())}
    reported = [t for t in paper_types if t in per_type] or list(per_type)
    out = {f"acc_{t}": v for t, v in per_type.items()}
    out[AA] = sum(per_type[t] for t in reported) / len(reported)
    out[AA_ALL] = sum(per_type.values()) / len(per_type)
    out[OA] = 100 * sum(item_hits) / len(preds)
    columns = {"hit": item_hits, "paper_type": [t in paper_types for t in types]}
    columns |= {TYPE_PREFIX + t: [u == t for u in types] for t in per_type}
    return ItemStats("vqa", ids, columns, out)


def grounding_scores(preds: list[str], boxes: list[tuple[float, float, float, float]],
                     sizes: list[tuple[int, int]]) -> dict[str, float]:
    """x100: `acc_at_0.5` (IoU > 0.5 with the first parsed box; unparseable = miss), `parsed`
    (share of answers holding a box) and `mean_iou` (unparseable counts as 0)."""
    return grounding_items(preds, boxes, sizes).scores


def grounding_items(preds: list[str], boxes: list[tuple[float, float, float, float]],
                    sizes: list[tuple[int, int]], ids: list | None = None) -> ItemStats:
    """`grounding_scores` with each item's hit, parse and IoU, for bootstrap intervals."""
    n = _same_length(preds=preds, boxes=boxes, sizes=sizes)
    if n == 0:
        raise ValueError("grounding_scores: no samples")
    ids = _ids(ids, n)
    ious, parsed = [], []
    for text, gt, (w, h) in zip(preds, boxes, sizes, strict=True):
        box = first_box_pixels(text, w, h)
        parsed.append(box is not None)
        ious.append(iou(box, gt) if box is not None else 0.0)
    hits = [v > 0.5 for v in ious]
    scores = {ACC_AT_05: 100 * sum(hits) / n, "parsed": 100 * sum(parsed) / n, "mean_iou": 100 * sum(ious) / n}
    return ItemStats("grounding", ids, {"hit": hits, "parsed": parsed, "iou": ious}, scores)
