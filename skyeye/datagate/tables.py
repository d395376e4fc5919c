"""Flatten the instruction and evaluation files into the tables the GX gate checks.

`build_tables(instructions_dir)` reads `stage1.json`, `stage2.json`, `eval/*.json` and
`validation/*.json` (the latter two alike: eval sample rows, checked for leakage into training)
(layouts in docs/data.md) and returns plain pandas DataFrames, one row per file,
sample, turn, box, referenced image/video, eval sample, eval image and VQA question type.
It judges nothing: every problem becomes a column value (a parse or schema error
message, a flag, a count) that an expectation in `skyeye.datagate.expectations` checks, so a bad
file or record is reported rather than raised. Each distinct image/video is decoded
once, in a thread pool (PIL and libav do most of their decoding outside the GIL).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile

from ..config import LeakageConfig
from ..formats.benchmarks import EVAL_DIR, TASKS, VALIDATION_DIR
from ..formats.boxes import BOX_LIKE_RE, BOX_RE
from ..formats.prompts import IMAGE_PLACEHOLDER
from .leakage import HashCache, Leak, find_leaks

NO_IDENTIFIER = "(none)"  # a human turn without one: a value, so the in-set check sees it
# Turns that must carry box text: grounding answers, identify prompts, detection answers.
BOXED_TURNS = {("gpt", "[refer]"), ("gpt", "[detection]"), ("human", "[identify]")}

_IDENTIFIER = re.compile(r"\s*(\[[^\]\s]*\])")

# Columns per table, so empty tables still have them (GX needs the columns to exist).
COLUMNS = {
    "files": ["file", "kind", "exists", "parse_error", "schema_error", "n_records", "eval_key"],
    # stage_task, task_identifier, stage_pairs: pairs joined into one string, because GX's
    # pandas column-pair-in-set check walks rows one by one (seconds on 20k samples).
    "samples": ["file", "index", "id", "stage", "source", "task", "media", "schema_error",
                "stage_task", "task_identifier", "stage_pairs", "last_role", "prompt_text",
                "answer_text"],
    "turns": ["file", "index", "id", "turn", "role", "expected_role", "value", "identifier",
              "img_tags", "expected_img_tags", "caption_words", "answer_chars", "required_boxes"],
    "boxes": ["file", "index", "id", "turn", "text", "parse_ok", "x1", "y1", "x2", "y2"],
    "images": ["file", "index", "id", "path", "kind", "exists", "bytes", "width", "height",
               "frames", "error"],
    "eval_samples": ["file", "index", "id", "benchmark", "task", "path", "media", "schema_error",
                     "prompt_identifier", "n_references", "ref_words_min", "ref_words_max",
                     "answer_chars", "question_type", "x1", "y1", "x2", "y2", "width", "height",
                     "actual_width", "actual_height"],
    "leakage": ["file", "index", "id", "benchmark", "path", "train_id", "train_source", "train_file",
                "train_path", "distance"],
    "vqa_types": ["file", "question_type", "count", "share"],
}
NUMERIC = {"n_records", "turn", "img_tags", "expected_img_tags", "caption_words",
           "answer_chars", "required_boxes", "x1", "y1", "x2", "y2", "bytes", "width", "height",
           "frames", "n_references", "ref_words_min", "ref_words_max", "actual_width",
           "actual_height", "count", "share", "distance"}


@dataclass
class Tables:
    frames: dict[str, pd.DataFrame]  # table name -> rows, columns as in COLUMNS
    n_instructions: int
    n_eval: int
    leaks: list[Leak] = field(default_factory=list)  # by content and pHash (leakage.find_leaks)


def _frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(rows, columns=COLUMNS[name])
    for col in NUMERIC.intersection(df.columns):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _id(rec: dict[str, Any]) -> str | None:
    """The record's id as text (a non-string id is a schema error, but must stay hashable)."""
    sid = rec.get("id")
    return sid if sid is None or isinstance(sid, str) else json.dumps(sid)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Collector:
    """Accumulates rows while walking the files; media are keyed by normalised path."""

    def __init__(self, root: Path):
        self.root = root
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in COLUMNS}
        self.media: dict[str, dict[str, Any]] = {}  # path -> first referrer
        self.train_media: dict[str, tuple[str, str]] = {}  # path -> (sample id, source)

    def register(self, folder: str, ref: Any, kind: str, file: str, index: int, sid: Any) -> str | None:
        if not _text(ref):
            return None
        key = os.path.normpath(os.path.join(folder, ref))
        self.media.setdefault(key, {"file": file, "index": index, "id": sid, "path": ref, "kind": kind})
        return key

    # -- instruction files ------------------------------------------------------------
    def instruction_file(self, data: Any, file: str, stage: str, frow: dict[str, Any]) -> None:
        if not isinstance(data, list):
            frow["schema_error"] = "stage file must be a JSON list of samples"
            return
        frow["n_records"] = len(data)
        folder = str(self.root)
        for index, rec in enumerate(data):
            self.instruction(rec, file, stage, index, folder)

    def instruction(self, rec: Any, file: str, stage: str, index: int, folder: str) -> None:
        problem = _instruction_problem(rec)
        rec = rec if isinstance(rec, dict) else {}
        sid = _id(rec)
        kind = "video" if "video" in rec else "image"
        media = self.register(folder, rec.get(kind), kind, file, index, sid)
        if media is not None:
            self.train_media.setdefault(media, (str(sid), str(rec.get("source"))))
        conv = rec.get("conversations")
        turns = [t for t in conv if isinstance(t, dict) and isinstance(t.get("from"), str)
                 and isinstance(t.get("value"), str)] if isinstance(conv, list) else []
        first_identifier, current = None, None
        prompts, answers = [], []
        for i, t in enumerate(turns):
            role, value = t["from"], t["value"]
            row = {"file": file, "index": index, "id": sid, "turn": i, "role": role,
                   "expected_role": "human" if i % 2 == 0 else "gpt", "value": value,
                   "img_tags": value.count(IMAGE_PLACEHOLDER), "expected_img_tags": int(i == 0)}
            if role == "human":
                m = _IDENTIFIER.match(value.replace(IMAGE_PLACEHOLDER, "", 1))
                current = row["identifier"] = m.group(1) if m else NO_IDENTIFIER
                first_identifier = first_identifier or current
                prompts.append(value)
            else:
                answers.append(value)
                if current == "[caption]":
                    row["caption_words"] = len(value.split())
                elif current in ("[vqa]", "[identify]"):
                    row["answer_chars"] = len(value)
            boxes = BOX_LIKE_RE.findall(value)
            if (role, current) in BOXED_TURNS:
                row["required_boxes"] = len(boxes)
            self.rows["turns"].append(row)
            for text in boxes:
                m = BOX_RE.fullmatch(text)
                coords = dict(zip(("x1", "y1", "x2", "y2"), map(int, m.groups()), strict=True)) if m else {}
                self.rows["boxes"].append({"file": file, "index": index, "id": sid, "turn": i,
                                           "text": text, "parse_ok": m is not None, **coords})
        self.rows["samples"].append({
            "file": file, "index": index, "id": sid, "stage": stage, "source": rec.get("source"),
            "task": rec.get("task"), "media": media, "schema_error": problem,
            "stage_task": f"{stage}/{rec.get('task')}",
            "task_identifier": f"{rec.get('task')}/{first_identifier}",
            "stage_pairs": f"{stage}/{len(turns) // 2}",
            "last_role": turns[-1]["from"] if turns else None,
            "prompt_text": "\n".join(prompts), "answer_text": "\n".join(answers)})

    # -- evaluation files ---------------------------------------------------------------
    def eval_file(self, data: Any, path: Path, file: str, frow: dict[str, Any]) -> None:
        if not isinstance(data, dict):
            frow["schema_error"] = "eval file must be a JSON object"
            return
        bench, split, task, samples = (data.get(k) for k in ("benchmark", "split", "task", "samples"))
        frow["eval_key"] = f"{bench}/{split}/{task}"
        if not (_text(bench) and _text(split) and task in TASKS):
            frow["schema_error"] = "needs 'benchmark', 'split' and 'task' (caption, vqa or grounding)"
        elif path.name != f"{bench}_{split}.json":
            frow["schema_error"] = f"file name should be {bench}_{split}.json"
        if not isinstance(samples, list):
            frow["schema_error"] = "'samples' must be a list"
            return
        frow["n_records"] = len(samples)
        folder = str(path.parent)
        for index, rec in enumerate(samples):
            self.eval_sample(rec, file, folder, index, bench, task)

    def eval_sample(self, rec: Any, file: str, folder: str, index: int, bench: Any, task: Any) -> None:
        problem = _eval_problem(rec, task)
        rec = rec if isinstance(rec, dict) else {}
        sid = _id(rec)
        kind = "video" if "video" in rec else "image"
        row: dict[str, Any] = {"file": file, "index": index, "id": sid, "benchmark": bench,
                               "task": task, "schema_error": problem, "path": rec.get(kind),
                               "media": self.register(folder, rec.get(kind), kind, file, index, sid)}
        if _text(rec.get("prompt")):
            m = _IDENTIFIER.match(rec["prompt"])
            row["prompt_identifier"] = m.group(1) if m else NO_IDENTIFIER
        refs = rec.get("references")
        if isinstance(refs, list) and all(isinstance(r, str) for r in refs):
            words = [len(r.split()) for r in refs]
            row.update(n_references=len(refs), ref_words_min=min(words, default=None),
                       ref_words_max=max(words, default=None))
        if isinstance(rec.get("answer"), str):
            row["answer_chars"] = len(rec["answer"])
        row["question_type"] = rec.get("question_type")
        box, size = rec.get("box"), rec.get("image_size")
        if isinstance(box, list) and len(box) == 4 and all(map(_number, box)):
            row.update(zip(("x1", "y1", "x2", "y2"), box, strict=True))
        if isinstance(size, list) and len(size) == 2 and all(map(_number, size)):
            row.update(width=size[0], height=size[1])
        self.rows["eval_samples"].append(row)


def _instruction_problem(rec: Any) -> str | None:
    """First way a sample breaks the instruction layout, or None."""
    if not isinstance(rec, dict):
        return "sample is not a JSON object"
    for key in ("id", "source", "task"):
        if not _text(rec.get(key)):
            return f"'{key}' missing or not a non-empty string"
    if _text(rec.get("image")) == _text(rec.get("video")):
        return "needs exactly one of 'image' or 'video' (a relative path)"
    if "video" in rec and not (isinstance(rec.get("frames"), int) and rec["frames"] >= 1):
        return "'video' needs 'frames' (an int >= 1)"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        return "'conversations' must be a list of at least 2 turns"
    if not all(isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
               for t in conv):
        return "every turn needs string 'from' and 'value'"
    return None


_EVAL_FIELDS = {"caption": ("references",), "vqa": ("question", "answer", "question_type"),
                "grounding": ("expression", "box", "image_size")}


def _eval_problem(rec: Any, task: Any) -> str | None:
    """First way an eval sample breaks the layout of its file's task, or None."""
    if not isinstance(rec, dict):
        return "sample is not a JSON object"
    if not _text(rec.get("id")):
        return "'id' missing or not a non-empty string"
    if _text(rec.get("image")) == _text(rec.get("video")):
        return "needs exactly one of 'image' or 'video' (a relative path)"
    if "prompt" in rec and not _text(rec["prompt"]):
        return "'prompt' must be a non-empty string"
    for key in _EVAL_FIELDS.get(task, ()):
        value = rec.get(key)
        if key == "references":
            ok = isinstance(value, list) and len(value) > 0 and all(isinstance(r, str) for r in value)
        elif key == "box":
            ok = isinstance(value, list) and len(value) == 4 and all(map(_number, value))
        elif key == "image_size":
            ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
        else:
            ok = _text(value)
        if not ok:
            return f"'{key}' missing or malformed for a {task} sample"
    return None


def probe_media(path: str, kind: str) -> dict[str, Any]:
    """Open one image (PIL, full decode: catches truncated files) or video (libav: every
    packet demuxed, frames decoded until the first one). Never raises."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return {"exists": False}
    out: dict[str, Any] = {"exists": True, "bytes": size}
    try:
        if kind == "video":
            import av  # only CapERA has videos; keeps the import off the common path

            with av.open(path) as container:
                stream = container.streams.video[0]
                frames, decoded = 0, False
                for packet in container.demux(stream):
                    if packet.size == 0:  # the flush packet at the end
                        continue
                    frames += 1
                    decoded = decoded or bool(packet.decode())
                if frames and not decoded:  # short clips can sit in the decoder's delay
                    decoded = bool(stream.codec_context.decode(None))
                out["frames"] = frames
                if not decoded:  # e.g. a cut moov atom: the file opens with an empty stream
                    out["error"] = f"no decodable video frame ({frames} packets)"
                else:
                    out.update(width=stream.codec_context.width, height=stream.codec_context.height)
        else:
            with Image.open(path) as im:
                im.load()
                out.update(width=im.width, height=im.height)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def build_tables(instructions_dir: Path, workers: int | None = None, leakage: LeakageConfig | None = None,
                 cache: HashCache | None = None) -> Tables:
    """Read every instruction and eval file under `instructions_dir` into tables. With
    `leakage`, the leakage table also names training samples whose image has the same bytes
    as an eval image or is a pHash near-duplicate of it, not only the same path."""
    root = Path(instructions_dir)
    col = _Collector(root)
    paths = [root / "stage1.json", root / "stage2.json", *sorted((root / EVAL_DIR).glob("*.json")),
             *sorted((root / VALIDATION_DIR).glob("*.json"))]
    for path in paths:
        _read_file(col, path)
    probes = _probe_all(col.media, workers)
    col.rows["images"] = [{**col.media[k], **probes[k]} for k in col.media]
    for row in col.rows["eval_samples"]:
        probe = probes.get(row["media"]) or {}
        row.update(actual_width=probe.get("width"), actual_height=probe.get("height"))
    leaks = find_leaks(root, leakage, cache) if leakage is not None else []
    col.rows["leakage"] = _leakage_rows(col.rows["eval_samples"], col.train_media, leaks)
    col.rows["vqa_types"] = _vqa_type_rows(col.rows["eval_samples"])
    frames = {name: _frame(name, rows) for name, rows in col.rows.items()}
    return Tables(frames, n_instructions=len(col.rows["samples"]), n_eval=len(col.rows["eval_samples"]),
                  leaks=leaks)


def _read_file(col: _Collector, path: Path) -> None:
    """One instruction or eval file into `col`: its row in `files` (missing, unparsable or
    its record count), its records into the other tables."""
    root = col.root
    file = path.relative_to(root).as_posix()
    is_eval = path.parent != root
    frow: dict[str, Any] = {"file": file, "kind": "eval" if is_eval else path.stem, "exists": path.is_file()}
    col.rows["files"].append(frow)
    if not frow["exists"]:
        return
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        frow["parse_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return
    if is_eval:
        col.eval_file(data, path, file, frow)
    else:
        col.instruction_file(data, file, path.stem, frow)


def _probe_all(media: dict[str, dict[str, Any]], workers: int | None) -> dict[str, dict[str, Any]]:
    """`probe_media` of every referenced file (path -> its probe), in a thread pool."""
    keys = list(media)
    # Training code often sets LOAD_TRUNCATED_IMAGES, which would let cut files pass here.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
            return dict(zip(keys, pool.map(lambda k: probe_media(k, media[k]["kind"]), keys), strict=True))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _leakage_rows(eval_rows: list[dict[str, Any]], train_media: dict[str, tuple[str, str]],
                  leaks: list[Leak]) -> list[dict[str, Any]]:
    """One row per eval image and file, naming the training sample that uses the same file,
    else the closest one whose image has the same bytes or a near pHash (if any)."""
    closest: dict[tuple[str, int], Leak] = {}  # (eval file, index of the image's first use) -> leak
    for leak in sorted(leaks, key=lambda x: x.distance):
        closest.setdefault((leak.test_file, leak.test_index), leak)
    rows, seen = [], set()
    for row in eval_rows:
        if row["media"] is None or (row["file"], row["media"]) in seen:
            continue
        seen.add((row["file"], row["media"]))
        # Any training use counts, whatever its `source`: paths are normalised, so a match
        # is the same file (in practice always one of the eval file's own benchmark).
        train_id, train_source = train_media.get(row["media"], (None, None))
        out = {"file": row["file"], "index": row["index"], "id": row["id"], "benchmark": row["benchmark"],
               "path": row["path"], "train_id": train_id, "train_source": train_source,
               "distance": 0 if train_id is not None else None}
        if train_id is None and (leak := closest.get((row["file"], row["index"]))):
            out.update(train_id=leak.train_id, train_source=leak.train_source, train_file=leak.train_file,
                       train_path=leak.train_path, distance=leak.distance)
        rows.append(out)
    return rows


def _vqa_type_rows(eval_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per VQA eval file, each question type's count and share of the file's typed questions."""
    per_file: dict[str, Counter] = {}
    for row in eval_rows:
        if row["task"] == "vqa" and isinstance(row["question_type"], str):
            per_file.setdefault(row["file"], Counter())[row["question_type"]] += 1
    return [{"file": f, "question_type": t, "count": n, "share": n / sum(c.values())}
            for f, c in per_file.items() for t, n in sorted(c.items())]
