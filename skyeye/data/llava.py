"""Instruction sets in the LLaVA conversation format, read as training sources.

Most RS instruction sets after SkyEyeGPT (GeoChat's, VHM's, LHRS-Bot's) ship as one LLaVA
JSON file, `[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}]`, with the images in a folder of their own. This module
maps such a file onto SkyEyeGPT's template (docs/data.md, "LLaVA instruction sets"): the
image placeholder, a task identifier on every human turn (kept when the text has one of
SkyEyeGPT's five, else inferred by `infer_identifier`), boxes rewritten as `{<x1><y1><x2><y2>}`
on the 0-100 grid from the notation the source declares (`BOX_FORMATS`; `auto` infers it
by `infer_box_format`). Rows that cannot be mapped, or that the data gate would refuse, are
counted and named in a `ReadReport`, never dropped silently.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import SourceConfig
from ..datagate.expectations import LIMITS
from ..formats.benchmarks import BENCHMARKS
from ..formats.boxes import BOX_LIKE_RE, BOX_RE, GRID, box_text
from ..formats.prompts import IMAGE_PLACEHOLDER, TASK_IDENTIFIERS
from .records import BOX_CLIPPED, DataFormatError, ReadReport, fit_box, read_json

LLAVA_IMAGE = "<image>"  # LLaVA's image placeholder
# how a source writes its box numbers: SkyEyeGPT's own 0-100 grid, fractions of the side,
# Qwen-VL's 0-1000 grid, or pixels of the image; `auto` infers one per file (infer_box_format)
BOX_FORMATS = ("grid100", "unit", "grid1000", "pixels")
SCALE = {"grid100": 100, "unit": 1, "grid1000": 1000}  # the side's length in each grid notation
BOX_FORMAT_RULE = ("auto: every box number of the file in [0, 1] with at least one not a whole number -> unit; "
                   "every number a whole number no larger than 100 -> grid100; anything else (numbers up to "
                   "1000 may be a 0-1000 grid or pixels) is not guessed: the source must declare box_format")
MAX_PAIRS = LIMITS.stage2_pairs[1]  # longer conversations are cut to this many turn pairs
STAGE2_MIN_PAIRS = LIMITS.stage2_pairs[0]  # conversations of fewer pairs go to stage 1

_NUM = r"(-?\d+(?:\.\d+)?)"
# the box notations in circulation: MiniGPT-v2 / GeoChat `{<x1><y1><x2><y2>}` (GeoChat adds `|<angle>`),
# Shikra / LLaVA-1.5 `[x1, y1, x2, y2]`, Qwen-VL `<box>(x1,y1),(x2,y2)</box>`
_SEP = r"\s*,?\s*"
BOX_NOTATIONS = re.compile(
    r"\{\s*<" + _NUM + ">" + _SEP + "<" + _NUM + ">" + _SEP + "<" + _NUM + ">" + _SEP + "<" + _NUM + r">\s*"
    r"(?:\|\s*<?" + _NUM + r">?\s*)?\}"
    r"|\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]"
    r"|<box>\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*,\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*</box>")
_LEADING_TAG = re.compile(r"\s*\[([A-Za-z_ ]+)\]\s*")  # another set's task tag, e.g. GeoChat's [grounding]
_CAPTION_WORDS = re.compile(r"\b(describe|description|caption|summari[sz]e)\b", re.IGNORECASE)
IDENTIFIER_TASK = {"[caption]": "caption", "[vqa]": "vqa", "[refer]": "refer", "[identify]": "identify",
                   "[detection]": "detection"}  # the stage-1 task of each identifier (prompts.TASK_TO_IDENTIFIER)


class BadRow(Exception):
    """A row that cannot be mapped: the reason (counted) and where (named)."""

    def __init__(self, reason: str, where: str):
        self.reason, self.where = reason, where
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class LlavaSample:
    source: str  # the source's name, e.g. "geochat"
    id: str  # the row's id as the file gives it
    image: Path
    turns: tuple[tuple[str, str], ...]  # (human, gpt), SkyEyeGPT's template, without the image placeholder
    task: str  # a stage-1 task (the first turn's identifier) or "conversation" (3+ pairs: stage 2)


def boxes_in(text: str) -> list[tuple[float, float, float, float, float | None]]:
    """Every box written in any notation of `BOX_NOTATIONS`: (x1, y1, x2, y2, angle or None)."""
    out = []
    for m in BOX_NOTATIONS.finditer(text):
        g = m.groups()
        nums = g[0:5] if g[0] is not None else (*g[5:9], None) if g[5] is not None else (*g[9:13], None)
        out.append(tuple(None if v is None else float(v) for v in nums))
    return out


def infer_box_format(values: Iterable[float]) -> str | None:
    """The notation of a file's box numbers by BOX_FORMAT_RULE; None when it is not to be guessed."""
    values = list(values)
    if not values:
        return "grid100"  # no box: the notation does not matter
    if all(0 <= v <= 1 for v in values) and any(v != int(v) for v in values):
        return "unit"
    if all(v == int(v) and 0 <= v <= GRID for v in values):
        return "grid100"
    return None


def infer_identifier(question: str, answer: str) -> str:
    """The task identifier of a turn pair that has none, boxes already in grid text; the first rule that holds:
    boxes in the answer and none in the question -> [detection] (several) or [refer] (one); a box in the
    question and none in the answer -> [identify]; the question asks to describe or caption -> [caption];
    else [vqa]."""
    asked, answered = len(boxes_in(question)), len(boxes_in(answer))
    if answered and not asked:
        return "[detection]" if answered > 1 else "[refer]"
    if asked and not answered:
        return "[identify]"
    if _CAPTION_WORDS.search(question):
        return "[caption]"
    return "[vqa]"


def grid_box(box: tuple[float, float, float, float], fmt: str, size: tuple[int, int], where: str,
             clipped: list[str] | None = None) -> str:
    """One box in notation `fmt` as grid text; BadRow when it does not fit the notation (or its image).
    A pixel box clipped to its image by the box policy is named in `clipped`."""
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise BadRow("box without area (needs x1 < x2 and y1 < y2)", where)
    if fmt == "pixels":  # as the benchmarks' pixel boxes: the box policy, then pixel / side x 100
        fit = fit_box(box, size)
        if fit.box is None:
            raise BadRow("box outside the image (box_format pixels)", f"{where} ({fit.detail})")
        if fit.status == "clipped" and clipped is not None:
            clipped.append(f"{where} ({fit.detail})")
        return box_text(fit.box, *size)
    side = SCALE[fmt]
    if not all(0 <= v <= side for v in box):
        raise BadRow(f"box outside the 0-{side} range of box_format {fmt}", where)
    # value / side x 100, truncated as to_grid does; the epsilon keeps 0.29 x 100 (28.999...) on 29
    g = [min(math.floor(v * GRID / side + 1e-9), GRID) for v in box]
    g[2], g[3] = max(g[2], g[0] + 1), max(g[3], g[1] + 1)  # thinner than a cell: one cell wide
    if g[2] > GRID:
        g[0], g[2] = GRID - 1, GRID
    if g[3] > GRID:
        g[1], g[3] = GRID - 1, GRID
    return "{<%d><%d><%d><%d>}" % tuple(g)


def _rewrite_boxes(text: str, fmt: str, size: tuple[int, int], where: str, clipped: list[str]) -> str:
    def one(m: re.Match) -> str:
        x1, y1, x2, y2, angle = boxes_in(m.group(0))[0]
        if angle:  # GeoChat's oriented boxes: an angle other than 0 has no axis-aligned box on the grid
            raise BadRow("oriented box (angle not 0)", f"{where}: {m.group(0)}")
        return grid_box((x1, y1, x2, y2), fmt, size, f"{where}: {m.group(0)}", clipped)
    return BOX_NOTATIONS.sub(one, text)


def _identifier(text: str) -> tuple[str | None, str]:
    """(SkyEyeGPT identifier the text holds or None, the text without it or another set's leading tag)."""
    found = sorted((text.find(i), i) for i in TASK_IDENTIFIERS if i in text)
    if found:
        ident = found[0][1]
        return ident, " ".join(text.replace(ident, " ", 1).split())
    m = _LEADING_TAG.match(text)
    return None, (text[m.end():] if m else text).strip()


def _check_for_gate(ident: str, question: str, answer: str, where: str) -> None:
    """What the data gate bounds (datagate.expectations.LIMITS), checked here so a source's row is left
    out and counted rather than failing the whole data version."""
    if max(len(question), len(answer)) > LIMITS.turn_chars:
        raise BadRow(f"turn longer than {LIMITS.turn_chars} characters", where)
    if not question or not answer:
        raise BadRow("empty turn", where)
    if ident == "[caption]" and not LIMITS.caption_words[0] <= len(answer.split()) <= LIMITS.caption_words[1]:
        raise BadRow("caption outside %d-%d words" % LIMITS.caption_words, where)
    if ident in ("[vqa]", "[identify]") and not LIMITS.answer_chars[0] <= len(answer) <= LIMITS.answer_chars[1]:
        raise BadRow("answer outside %d-%d characters" % LIMITS.answer_chars, where)
    if ident in ("[refer]", "[detection]") and not boxes_in(answer):
        raise BadRow(f"{ident} answer without a box", where)
    if ident == "[identify]" and not boxes_in(question):
        raise BadRow("[identify] question without a box", where)
    unparsed = [t for t in BOX_LIKE_RE.findall(question + " " + answer) if not BOX_RE.fullmatch(t)]
    if unparsed:
        raise BadRow("box text in no known notation", f"{where}: {unparsed[0]}")


def _turn_pairs(conv: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise BadRow("'conversations' missing or not a list of turns", f"{where}.conversations")
    pairs = []
    for t, turn in enumerate(conv):
        role = "human" if t % 2 == 0 else "gpt"
        if not (isinstance(turn, dict) and turn.get("from") == role and isinstance(turn.get("value"), str)):
            raise BadRow("turns do not alternate human/gpt (each with a string 'value')",
                         f"{where}.conversations[{t}]")
        if role == "gpt":
            pairs.append((conv[t - 1]["value"], turn["value"]))
    if len(conv) % 2:
        raise BadRow("conversation ends with a human turn", f"{where}.conversations[{len(conv) - 1}]")
    return pairs


class LlavaReader:
    """Reads one LLaVA JSON file of source `name` with its images under `images`."""

    def __init__(self, name: str, file: Path, images: Path, box_format: str = "auto"):
        if box_format != "auto" and box_format not in BOX_FORMATS:
            raise ValueError(f"source {name}: box_format {box_format!r}: choose auto or one of "
                             f"{', '.join(BOX_FORMATS)}")
        self.name, self.file, self.images, self.declared = name, Path(file), Path(images), box_format
        self.report = ReadReport(name)
        self.box_format = box_format
        self._sizes: dict[Path, tuple[int, int]] = {}

    def read(self) -> list[LlavaSample]:
        rows = read_json(self.file)
        if not isinstance(rows, list):
            raise DataFormatError(self.file, "(top level)", f"expected a list of samples (LLaVA format), "
                                                           f"got {type(rows).__name__}")
        if self.declared == "auto":
            numbers = [v for row in rows if isinstance(row, dict) and isinstance(row.get("conversations"), list)
                       for turn in row["conversations"] if isinstance(turn, dict) and isinstance(turn.get("value"), str)
                       for box in boxes_in(turn["value"]) for v in box[:4]]
            self.box_format = infer_box_format(numbers)
            if self.box_format is None:
                raise DataFormatError(self.file, "box_format", f"box numbers from {min(numbers):g} to "
                                      f"{max(numbers):g} are not inferred; declare the source's box_format "
                                      f"({', '.join(BOX_FORMATS)}). The rule: {BOX_FORMAT_RULE}")
        out, seen_ids, seen = [], set(), set()
        for index, row in enumerate(rows):
            where = f"{self.file.name}[{index}]"
            try:
                sample = self._row(row, where)
                if sample.id in seen_ids:
                    raise BadRow("duplicate id", f"{where}.id={sample.id}")
                key = (sample.image, sample.turns)
                if key in seen:
                    raise BadRow("duplicate sample (same image and turns)", where)
            except BadRow as bad:
                self.report.skip(bad.reason, example=bad.where, split="train")
                continue
            seen_ids.add(sample.id)
            seen.add(key)
            out.append(sample)
            self.report.kept["train"] += 1
        return out

    def _row(self, row: Any, where: str) -> LlavaSample:
        if not isinstance(row, dict):
            raise BadRow("row is not a JSON object", where)
        sid = row.get("id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
            raise BadRow("'id' missing or not a string or integer", f"{where}.id")
        where = f"{where} (id {sid})"
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise BadRow("no image (a text-only row)", f"{where}.image")
        path = self.images / image
        if not path.is_file():
            raise BadRow("missing image file", f"{where}.image={image}")
        size = self._sizes.get(path)
        if size is None:  # many rows ask about one image: its header is read once
            try:
                with Image.open(path) as im:
                    size = self._sizes[path] = im.size
            except OSError as err:
                raise BadRow("image does not open", f"{where}.image={image}: {err}") from None
        if not all(LIMITS.image_side[0] <= s <= LIMITS.image_side[1] for s in size):
            raise BadRow("image side outside %d-%d px" % LIMITS.image_side, f"{where}.image={image} {size}")
        pairs = _turn_pairs(row.get("conversations"), where)
        if len(pairs) > MAX_PAIRS:
            self.report.clip(f"conversation cut to {MAX_PAIRS} turn pairs", f"{where}: {len(pairs)} pairs")
            pairs = pairs[:MAX_PAIRS]
        turns, tasks, clipped = [], [], []
        for n, (question, answer) in enumerate(pairs):
            at = f"{where}.conversations[{2 * n}]"
            if question.count(LLAVA_IMAGE) > (n == 0):
                raise BadRow(f"{LLAVA_IMAGE} other than once in the first human turn", at)
            question = " ".join(question.replace(LLAVA_IMAGE, " ").split())
            ident, question = _identifier(_rewrite_boxes(question, self.box_format, size, at, clipped))
            # an answer keeps its line breaks (a list, paragraphs); a question is one line after its identifier
            answer = _rewrite_boxes(answer, self.box_format, size, f"{where}.conversations[{2 * n + 1}]",
                                    clipped).strip()
            ident = ident or infer_identifier(question, answer)
            _check_for_gate(ident, question, answer, at)
            turns.append((f"{ident} {question}", answer))
            tasks.append(IDENTIFIER_TASK[ident])
        for detail in clipped:  # counted once the row is kept
            self.report.clip(BOX_CLIPPED, detail)
        task = "conversation" if len(turns) >= STAGE2_MIN_PAIRS else tasks[0]
        return LlavaSample(self.name, str(sid), path, tuple(turns), task)


def read_llava(name: str, file: Path, images: Path, box_format: str = "auto"
               ) -> tuple[list[LlavaSample], ReadReport, str]:
    """(samples, what was left out and why, the box notation used) of one LLaVA source."""
    reader = LlavaReader(name, file, images, box_format)
    samples = reader.read()
    return samples, reader.report, reader.box_format


def instruction_rows(samples: list[LlavaSample], rel) -> tuple[list[dict], list[dict]]:
    """(stage-1 rows, stage-2 rows) in the instruction file's layout; `rel` makes an image path
    relative to the instruction files (Builder.rel)."""
    stage1, stage2 = [], []
    for s in samples:
        conv = []
        for i, (q, a) in enumerate(s.turns):
            conv += [{"from": "human", "value": f"{IMAGE_PLACEHOLDER} {q}" if i == 0 else q},
                     {"from": "gpt", "value": a}]
        if s.task == "conversation":
            stage2.append({"id": f"s2-{s.source}-{s.id}", "source": s.source, "task": s.task,
                           "image": rel(s.image), "conversations": conv})
        else:
            stage1.append({"id": f"s1-{s.source}-{s.task}-{s.id}", "source": s.source, "task": s.task,
                           "image": rel(s.image), "conversations": conv})
    return stage1, stage2


def check_llava_sources(specs: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
    """The LLaVA sources of a build, each checked before anything is read: a name of its own (not
    a benchmark's: its rows would pass for the benchmark's), its file and its images folder."""
    for name, spec in specs.items():
        where = f"source {name} ({spec.path})"
        if name in BENCHMARKS:
            raise ValueError(f"{where}: {name!r} names a benchmark; give the LLaVA set a name of its own")
        if not spec.path.is_file():
            raise ValueError(f"{where}: no such file")
        if spec.images is None or not spec.images.is_dir():
            raise ValueError(f"{where}: images folder {spec.images} not found")
    return specs


def add_llava_sources(builder, specs: dict[str, SourceConfig], reports: list[ReadReport]) -> dict[str, dict]:
    """Read each LLaVA source into the builder's stages (its report appended to `reports`);
    returns the data card's `llava` entry: per source, its file and the box notation used."""
    card = {}
    for name, spec in sorted(specs.items()):
        samples, report, fmt = read_llava(name, spec.path.resolve(), spec.images.resolve(), spec.box_format)
        reports.append(report)
        stage1, stage2 = instruction_rows(samples, builder.rel)
        builder.stage1 += stage1
        builder.stage2 += stage2
        card[name] = {"file": spec.path.name, "box_format": fmt if spec.box_format != "auto" else f"{fmt} (inferred)"}
    return card
