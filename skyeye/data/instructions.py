"""The instruction builder: benchmark records -> our SkyEye-968k.

Stage 1: single-task instructions from the train splits (captions, video captions,
VQA, scene classification as `[vqa]`, `[refer]`, `[identify]`, `[detection]`).
Stage 2: multi-task conversations, several turns about one image that mix tasks and
granularity (scene, region, object), as the paper's *-Conversa sets do.
Evaluation: one normalised file per scored split (`eval/`, sealed: the evaluation alone
reads it), with all references, question types and pixel boxes; validation: one file of
the same form per benchmark that has a validation split (`validation/`, what training may
read; `formats.benchmarks.VALIDATION_KEYS` says which and why). Instruction sets in the LLaVA
format join stage 1 and 2 after the benchmarks (`llava`). The card records each source's licence
(`formats.licences`). Formats: docs/data.md.
Output is deterministic.
"""
from __future__ import annotations

import json
import os
import zlib
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pycocoevalcap.cider.cider import Cider

from ..config import LeakageConfig
from ..datagate.leakage import LEAKAGE_FILE, HashCache, drop_leaked, find_leaks, leak_lines, leak_report
from ..formats import prompts
from ..formats.benchmarks import (
    BENCHMARKS,
    EVAL_DIR,
    HOLDOUT_MODULUS,
    SCORED_SPLITS,
    TASK,
    VALIDATION_DIR,
    VALIDATION_KEYS,
)
from ..config import SourceConfig, as_source
from ..formats.boxes import box_text, boxes_text
from ..formats.files import folder_in_place
from ..formats.prompts import VIDEO_FRAMES
from ..formats.licences import UNKNOWN, benchmark_licence
from .capera import event_words
from .llava import add_llava_sources, check_llava_sources
from .readers import detect_benchmark, read_benchmark
from .records import (
    BOX_CLIPPED,
    BOX_OUTSIDE,
    BOX_POLICY,
    MAX_EXAMPLES,
    CaptionSample,
    GroundingSample,
    ReadReport,
    Sample,
    VQASample,
)

# DIOR-style class names -> words for [detection] phrases (unknown names are used as they are)
CLASS_WORDS = {"storagetank": ("storage tank", "storage tanks"), "tenniscourt": ("tennis court", "tennis courts"),
               "airplane": ("airplane", "airplanes"), "ship": ("ship", "ships"), "vehicle": ("vehicle", "vehicles"),
               "building": ("building", "buildings"), "bridge": ("bridge", "bridges")}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _human(text: str, first: bool) -> dict:
    return {"from": "human", "value": f"{prompts.IMAGE_PLACEHOLDER} {text}" if first else text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


class Builder:
    """Collects samples per stage; paths are written relative to the output folder."""

    def __init__(self, out: Path):
        self.out = out
        self.stage1: list[dict] = []
        self.stage2: list[dict] = []
        self._sizes: dict[Path, tuple[int, int]] = {}

    def rel(self, path: Path, base: Path | None = None) -> str:
        return os.path.relpath(path, base or self.out).replace(os.sep, "/")

    def size(self, path: Path) -> tuple[int, int]:
        if path not in self._sizes:
            with Image.open(path) as im:  # reads the header only
                self._sizes[path] = im.size
        return self._sizes[path]

    def media(self, s: Sample, base: Path | None = None) -> dict:
        """The image (or clip) path relative to the file that will hold it."""
        if isinstance(s, CaptionSample) and s.is_video:
            return {"video": self.rel(s.image, base), "frames": VIDEO_FRAMES}
        return {"image": self.rel(s.image, base)}

    def add1(self, task: str, s: Sample, turns: list[dict], n: int) -> None:
        self.stage1.append({"id": f"s1-{s.benchmark}-{task}-{s.id}-{n}", "source": s.benchmark, "task": task,
                            **self.media(s), "conversations": turns})

    # ------------------------------------------------------------ stage 1
    def captions(self, samples: list[CaptionSample]) -> None:
        """The captioning prompts get each image's first reference only: `build` puts the most
        consensual first (`consensus_first`); the others answer "in other words" turns in stage 2."""
        for s in samples:
            task = "video_caption" if s.is_video else "caption"
            ask = prompts.pick(task, s.id)
            self.add1(task, s, [_human(f"[caption] {ask}", True), _gpt(s.captions[0])], 0)
            if s.scene_class and not s.is_video:
                ask = prompts.pick("scene_vqa", s.id)
                self.add1("scene_vqa", s, [_human(f"[vqa] {ask}", True), _gpt(s.scene_class)], 0)

    def vqa(self, samples: list[VQASample]) -> None:
        for s in samples:
            self.add1("vqa", s, [_human(f"[vqa] {s.question}", True), _gpt(s.answer)], 0)

    def grounding(self, samples: list[GroundingSample]) -> None:
        for s in samples:
            w, h = s.image_size
            box = box_text(s.box, w, h)
            ask = prompts.pick("refer", s.id).format(expression=s.expression)
            self.add1("refer", s, [_human(f"[refer] {ask}", True), _gpt(box)], 0)
            ask = prompts.pick("identify", s.id).format(box=box)
            self.add1("identify", s, [_human(f"[identify] {ask}", True), _gpt(s.expression)], 0)
        for _image, group in _by_image(samples).items():
            by_class: dict[str, list[GroundingSample]] = defaultdict(list)
            for s in group:
                if s.category:  # RSVG as released names no category: no detection rows for it
                    by_class[s.category].append(s)
            for cls, objs in sorted(by_class.items()):
                phrase = count_phrase(cls, len(objs))
                singular = class_words(cls)[0]
                ask = prompts.pick("detection", objs[0].id).format(phrase=class_words(cls)[1],
                                                                 singular=singular)
                w, h = objs[0].image_size
                answer = boxes_text([o.box for o in objs], w, h, phrase=phrase)
                self.add1("detection", objs[0], [_human(f"[detection] {ask}", True), _gpt(answer)], 0)

    # ------------------------------------------------------------ stage 2
    def conversation(self, s: Sample, turns: list[tuple[str, str]]) -> None:
        conv = []
        for i, (q, a) in enumerate(turns):
            conv += [_human(q, i == 0), _gpt(a)]
        self.stage2.append({"id": f"s2-{s.benchmark}-{s.id}", "source": s.benchmark, "task": "conversation",
                            **self.media(s), "conversations": conv})

    def grounding_conversations(self, samples: list[GroundingSample]) -> None:
        """DIOR-Conversa style: scene (counts, presence), object ([refer]), region ([identify])."""
        for _image, group in _by_image(samples).items():
            rng = np.random.default_rng(zlib.crc32(str(group[0].id).encode()))
            # an object list, counts and detection need every object's category: a release
            # that names none (RSVG) gets object and region turns only
            named = all(s.category for s in group)
            counts = Counter(s.category for s in group)
            w, h = group[0].image_size
            cands = []
            if named:
                scene = " and ".join(count_phrase(c, n) for c, n in sorted(counts.items()))
                cands.append((f"[caption] {prompts.pick('inventory', group[0].id)}", f"there are {scene} in the image."))
                cls = sorted(counts)[int(rng.integers(len(counts)))]
                cands.append((f"[vqa] how many {class_words(cls)[1]} are there?", str(counts[cls])))
            for s in group:
                cands.append((f"[refer] {s.expression}", box_text(s.box, w, h)))
                cands.append((f"[identify] {box_text(s.box, w, h)}", s.expression))
            if named:
                objs = [s for s in group if s.category == cls]
                cands.append((f"[detection] {class_words(cls)[1]}",
                              boxes_text([o.box for o in objs], w, h, phrase=count_phrase(cls, len(objs)))))
            if len(cands) < 3:  # one unnamed object: too little for a conversation of 3+ turns
                continue
            self.conversation(group[0], _pick_turns(cands, rng))

    def caption_conversations(self, samples: list[CaptionSample]) -> None:
        """UCM/Sydney-Conversa style: a caption, the scene class when known, a second wording.
        Clips too, with their event class: with no clip of its own, stage 2 undid much of what
        stage 1 had learned of the direction of motion
        (docs/experiments/2026-11-29-capera-direction-of-motion.md)."""
        for s in samples:
            task = "video_caption" if s.is_video else "caption"
            turns = [(f"[caption] {prompts.pick(task, s.id)}", s.captions[0])]
            if s.scene_class and s.is_video:
                turns.append((f"[vqa] {prompts.pick('event_vqa', s.id)}", event_words(s.scene_class)))
            elif s.scene_class:
                turns.append((f"[vqa] {prompts.pick('scene_vqa', s.id)}", s.scene_class))
            turns.append(("[caption] Describe it once more in other words.", s.captions[1 % len(s.captions)]))
            if len(turns) < 3:
                turns.append(("[caption] And one more description, please.", s.captions[2 % len(s.captions)]))
            self.conversation(s, turns)

    def vqa_conversations(self, samples: list[VQASample]) -> None:
        """Several questions of different types about one image."""
        for _image, group in _by_image(samples).items():
            rng = np.random.default_rng(zlib.crc32(str(group[0].id).encode()))
            cands = [(f"[vqa] {s.question}", s.answer) for s in group]
            if len(cands) >= 3:
                self.conversation(group[0], _pick_turns(cands, rng))


def _words(text: str) -> str:
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def consensus_order(samples: list[CaptionSample]) -> list[list[int]]:
    """Per image, its reference indices from most to least consensual: CIDEr-D of each
    reference against the image's other references, with document frequencies from the
    whole split. Why: the five references of an image are five wordings; trained on all
    five, the model writes any of them, and CIDEr (which rewards what the references
    share) scores the consensus wording highest
    (docs/experiments/2026-11-29-captions-and-stage-2.md)."""
    multi = [i for i, s in enumerate(samples) if len(s.captions) > 1]
    orders = [list(range(len(s.captions))) for s in samples]
    if not multi:
        return orders
    width = max(len(samples[i].captions) for i in multi)
    scores = np.full((len(samples), width), -np.inf)
    for k in range(width):
        keys = [i for i in multi if k < len(samples[i].captions)]
        refs = {i: [_words(c) for j, c in enumerate(samples[i].captions) if j != k] for i in keys}
        cand = {i: [_words(samples[i].captions[k])] for i in keys}
        _, per_image = Cider().compute_score(refs, cand)
        scores[keys, k] = per_image
    for i in multi:  # stable: ties keep the published order
        orders[i] = sorted(range(len(samples[i].captions)), key=lambda k, i=i: -scores[i, k])
    return orders


def consensus_first(samples: list[CaptionSample]) -> list[CaptionSample]:
    """The samples with their references reordered, most consensual first."""
    return [replace(s, captions=tuple(s.captions[k] for k in order))
            for s, order in zip(samples, consensus_order(samples), strict=True)]


def _by_image(samples: list[Sample]) -> dict[Path, list]:
    groups: dict[Path, list] = defaultdict(list)
    for s in samples:
        groups[s.image].append(s)
    return dict(sorted(groups.items()))


def _pick_turns(cands: list[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """3 to 5 distinct turns, mixing whatever tasks the candidates hold."""
    n = min(len(cands), int(rng.integers(3, 6)))
    idx = rng.choice(len(cands), size=n, replace=False)
    return [cands[i] for i in sorted(idx)]


def class_words(cls: str) -> tuple[str, str]:
    """(singular, plural) of a class name for the instruction text; unknown names as they are."""
    return CLASS_WORDS.get(cls, (cls, cls))


def count_phrase(cls: str, n: int) -> str:
    """`two ships`: how the builder counts objects of a class in its answers."""
    singular, plural = class_words(cls)
    word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    return f"{word} {singular if n == 1 else plural}"


# ---------------------------------------------------------------- evaluation files
def validation_holdout(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) for a release without a val split: the images whose file name's
    crc32 is 0 modulo HOLDOUT_MODULUS (1 in 10) are held out of training, all their samples
    together, so no image is on both sides; the same files on every build and machine."""
    def held(s: Sample) -> bool:
        return zlib.crc32(s.image.name.encode()) % HOLDOUT_MODULUS == 0
    return [s for s in samples if not held(s)], [s for s in samples if held(s)]


def eval_samples(b: Builder, samples: list[Sample], folder: str = EVAL_DIR) -> list[dict]:
    out = []
    for s in samples:
        row = {"id": s.id, **b.media(s, b.out / folder)}
        if isinstance(s, CaptionSample):
            if not s.is_video:
                row["image_size"] = list(b.size(s.image))
            task = "video_caption" if s.is_video else "caption"
            row |= {"prompt": f"[caption] {prompts.first(task)}", "references": list(s.captions)}
        elif isinstance(s, VQASample):
            row |= {"image_size": list(b.size(s.image)), "prompt": f"[vqa] {s.question}", "question": s.question,
                    "answer": s.answer, "question_type": s.question_type}
        elif isinstance(s, GroundingSample):
            row |= {"image_size": list(s.image_size), "prompt": f"[refer] {s.expression}",
                    "expression": s.expression, "box": [float(v) for v in s.box]}
        out.append(row)
    return out


# ---------------------------------------------------------------- driver
def find_sources(root: Path, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """Benchmark folders found under `root` (by their layout), plus `extra` ones."""
    found: dict[str, Path] = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        name = detect_benchmark(folder)
        if name:
            found[name] = folder
    for name, path in (extra or {}).items():
        if name not in BENCHMARKS:
            raise ValueError(f"--source {name}={path}: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        if not Path(path).is_dir():
            raise ValueError(f"--source {name}={path}: no such folder")
        found[name] = Path(path)
    if not found:
        raise ValueError(f"{root}: no benchmark folder found (expected some of {', '.join(BENCHMARKS)})")
    return dict(sorted(found.items(), key=lambda kv: BENCHMARKS.index(kv[0])))


def build(root: Path, out: Path, extra: dict[str, Path | SourceConfig] | None = None,
          leakage: LeakageConfig | None = None, hash_cache: Path | None = None) -> dict:
    """Build stage-1/stage-2 instructions, evaluation files and the data card into `out`.
    `extra`: benchmark folders from elsewhere and LLaVA instruction sets (`SourceConfig`).
    Written to a temporary folder and renamed into place. Then the leakage check
    (`datagate.leakage`, rules in `leakage`, pHashes cached in `hash_cache`): with action
    drop, training samples whose image is an eval/validation image (same bytes or a pHash
    near-duplicate) are removed; every pair goes to `leakage.json` and the card."""
    specs = {name: as_source(v) for name, v in (extra or {}).items()}
    llava = check_llava_sources({k: v for k, v in specs.items() if v.is_llava})
    sources = find_sources(Path(root), {k: v.path for k, v in specs.items() if not v.is_llava})
    licences = {name: benchmark_licence(name, folder, specs[name].licence if name in specs else None)
                for name, folder in sources.items()}
    reports: list[ReadReport] = []
    eval_counts: dict[str, int] = {}
    validation: dict[str, dict] = {}  # bench_val -> samples and where they were held out of
    # the temporary folder sits beside `out` (same depth), so paths relative to it stay right
    with folder_in_place(Path(out)) as tmp:
        (tmp / EVAL_DIR).mkdir()
        (tmp / VALIDATION_DIR).mkdir()
        b = Builder(tmp)
        for name, folder in sources.items():
            train, report = read_benchmark(name, folder.resolve(), ["train"])
            reports.append(report)
            if f"{name}_val" in VALIDATION_KEYS:
                try:
                    val, rep = read_benchmark(name, folder.resolve(), ["val"])
                    reports.append(rep)
                except FileNotFoundError:  # a release without a val split file (DIOR-style val.txt)
                    val = []
                held_from = "val"
                if not val:  # the release has no val split: hold part of train out
                    train, val = validation_holdout(train)
                    held_from = "train"
                if val:  # a tiny corpus may have none
                    _write_json(tmp / VALIDATION_DIR / f"{name}_val.json",
                                {"benchmark": name, "split": "val", "task": TASK[name], "held_out_of": held_from,
                                 "samples": eval_samples(b, val, VALIDATION_DIR)})
                validation[f"{name}_val"] = {"samples": len(val), "held_out_of": held_from}
            if TASK[name] == "caption":
                train = consensus_first(train)
                b.captions(train)
                b.caption_conversations(train)
            elif TASK[name] == "vqa":
                b.vqa(train)
                b.vqa_conversations(train)
            else:
                b.grounding(train)
                b.grounding_conversations(train)
            for split in SCORED_SPLITS[name]:
                test, rep = read_benchmark(name, folder.resolve(), [split])
                reports.append(rep)
                rows = eval_samples(b, test)
                key = f"{name}_{split}"
                _write_json(tmp / EVAL_DIR / f"{key}.json",
                            {"benchmark": name, "split": split, "task": TASK[name], "samples": rows})
                eval_counts[key] = len(rows)
        llava_card = add_llava_sources(b, llava, reports)  # after the benchmarks: their rows keep their order
        licences |= {name: spec.licence or UNKNOWN for name, spec in llava.items()}
        _write_json(tmp / "stage1.json", b.stage1)
        _write_json(tmp / "stage2.json", b.stage2)
        cfg = leakage or LeakageConfig()
        leaks = find_leaks(tmp, cfg, HashCache(hash_cache))
        dropped = drop_leaked({"stage1.json": b.stage1, "stage2.json": b.stage2}, leaks) if cfg.action == "drop" else {}
        if any(dropped.values()):
            _write_json(tmp / "stage1.json", b.stage1)
            _write_json(tmp / "stage2.json", b.stage2)
        leak_card = leak_report(leaks, cfg, dropped)
        _write_json(tmp / LEAKAGE_FILE, leak_card)
        card = data_card(b, eval_counts, reports) | {"validation": validation, "licences": dict(sorted(licences.items())),
                                                     "leakage": leak_card}
        if llava_card:
            card["llava"] = llava_card
        _write_json(tmp / "card.json", card)
        (tmp / "DATA_CARD.md").write_text(render_card(card), encoding="utf-8")
    card["reports"] = [r.summary() for r in reports]
    return card


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=True, indent=None), encoding="utf-8")


def data_card(b: Builder, eval_counts: dict[str, int], reports: list[ReadReport]) -> dict:
    """Counts per stage, task and source; evaluation files; what the readers left out.

    `skipped` (benchmark -> reason -> rows) is always there. Only when some reader clipped
    a row or named offending rows do `clipped` (benchmark -> reason -> rows kept after
    clipping), `examples` (benchmark -> reason -> the first few rows, file and field) and,
    for boxes that left their image, `box_policy` (`records.BOX_POLICY`) appear: a corpus
    without such rows keeps its card byte for byte.
    """
    def counts(samples):
        return {"total": len(samples), "by_task": dict(sorted(Counter(s["task"] for s in samples).items())),
                "by_source": dict(sorted(Counter(s["source"] for s in samples).items()))}
    skipped: dict[str, dict[str, int]] = defaultdict(dict)
    for r in reports:
        for reason, n in r.skipped.items():
            skipped[r.benchmark][reason] = skipped[r.benchmark].get(reason, 0) + n
    card = {"stage1": counts(b.stage1), "stage2": counts(b.stage2), "eval": dict(sorted(eval_counts.items())),
            "skipped": dict(sorted(skipped.items()))}
    clipped: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for r in reports:
        clipped[r.benchmark].update(r.clipped)
        for reason, rows in r.examples.items():
            shown = examples[r.benchmark].setdefault(reason, [])
            shown += rows[:MAX_EXAMPLES - len(shown)]
    if any(clipped.values()):
        card["clipped"] = {k: dict(sorted(v.items())) for k, v in sorted(clipped.items()) if v}
    if any(examples.values()):
        card["examples"] = {k: dict(sorted(v.items())) for k, v in sorted(examples.items()) if v}
    if any(BOX_CLIPPED in v for v in clipped.values()) or any(BOX_OUTSIDE in v for v in skipped.values()):
        card["box_policy"] = BOX_POLICY
    return card


def render_card(card: dict) -> str:
    lines = ["# Data card: SkyEye instruction set", "",
             "Built by `skyeye data build` from the benchmark folders (SkyEye-Synth unless real data was given).", ""]
    for stage, title in (("stage1", "Stage 1: single-task instructions"),
                         ("stage2", "Stage 2: multi-task conversations")):
        c = card[stage]
        lines += [f"## {title} ({c['total']} samples)", "", "| task | samples | sources |", "|---|---|---|"]
        lines += [f"| {task} | {n} | |" for task, n in c["by_task"].items()]
        lines += ["", "| source | samples |", "|---|---|"]
        lines += [f"| {src} | {n} |" for src, n in c["by_source"].items()]
        lines.append("")
    lines += ["## Evaluation files", "", "| benchmark split | samples |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in card["eval"].items()]
    lines += ["", "## Validation files (what training may read; the evaluation files above are sealed)", "",
              "| benchmark split | samples | held out of |", "|---|---|---|"]
    lines += [f"| {k} | {v['samples']} | {v['held_out_of']} split |" for k, v in card.get("validation", {}).items()]
    if card["skipped"]:
        lines += ["", "## Rows left out by the readers", "", "| benchmark | reason | rows |", "|---|---|---|"]
        for bench, reasons in card["skipped"].items():
            lines += [f"| {bench} | {reason} | {n} |" for reason, n in sorted(reasons.items())]
    if card.get("clipped"):
        lines += ["", "## Rows kept after clipping", "", "| benchmark | reason | rows |", "|---|---|---|"]
        for bench, reasons in card["clipped"].items():
            lines += [f"| {bench} | {reason} | {n} |" for reason, n in reasons.items()]
    if card.get("examples"):
        lines += ["", "## Examples of the rows above (file and field)", ""]
        for bench, reasons in card["examples"].items():
            lines += [f"- {bench}, {reason}: `{row}`" for reason, rows in reasons.items() for row in rows]
    if card.get("box_policy"):
        lines += ["", f"Boxes and the image edge: {card['box_policy']}"]
    if card.get("licences"):
        lines += ["", "## Sources and their licences (inherited by every model trained on this data)", "",
                  "| source | licence or terms |", "|---|---|"]
        lines += [f"| {src} | {lic} |" for src, lic in card["licences"].items()]
    if card.get("llava"):
        lines += ["", "## LLaVA instruction sets", "", "| source | file | box notation |", "|---|---|---|"]
        lines += [f"| {src} | {v['file']} | {v['box_format']} |" for src, v in card["llava"].items()]
    lines += leak_lines(card.get("leakage"))
    return "\n".join(lines) + "\n"
