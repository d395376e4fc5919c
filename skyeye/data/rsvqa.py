"""Reader for RSVQA-LR and RSVQA-HR (Zenodo 6344334 / 6344367) in their native JSON layout.

Per split, three files each hold one list: `<P>_split_<split>_{images,questions,answers}.json`
(P = LR or USGS; HR's test set 2 is the split `test_phili`). Copies in circulation come
in two variants, accepted alike and detected per entry: (a) the split files carry full
objects; (b) they carry only `{"id", "active"}` and the rest lives in `all_questions.json`
/ `all_answers.json` (/ `all_images.json`) in the same folder. Rows are always joined by
id, never by list position. Only `active: true` rows count; every row left out is
counted in the ReadReport with its reason.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..formats.benchmarks import SPLITS
from .records import DataFormatError, ReadReport, VQASample, read_json, require

# benchmark -> (file prefix, image folder)
LAYOUTS: dict[str, tuple[str, str]] = {"rsvqa_lr": ("LR", "Images_LR"), "rsvqa_hr": ("USGS", "Data")}
KINDS = ("images", "questions", "answers")
# fields a row must carry once completed from all_<kind>.json, with their types
REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "images": {"active": bool},
    "questions": {"img_id": int, "type": str, "question": str, "answers_ids": list, "active": bool},
    "answers": {"answer": (str, int, float), "active": bool},
}
Row = dict[str, Any]


def split_file(benchmark: str, root: Path, split: str, kind: str) -> Path:
    return root / f"{LAYOUTS[benchmark][0]}_split_{split}_{kind}.json"


def available_splits(benchmark: str, root: Path) -> tuple[str, ...]:
    """Splits with files present; a split with only some of its three files is an error."""
    found = []
    for split in SPLITS[benchmark]:
        present = [split_file(benchmark, root, split, k).is_file() for k in KINDS]
        if all(present):
            found.append(split)
        elif any(present):
            missing = split_file(benchmark, root, split, KINDS[present.index(False)])
            raise DataFormatError(missing, "(whole file)", f"missing while other '{split}' files exist")
    if not found:
        pattern = f"{LAYOUTS[benchmark][0]}_split_*_questions.json"
        raise DataFormatError(root, pattern, "no RSVQA split files in this folder")
    return tuple(found)


class _Complements:
    """`all_<kind>.json` files, loaded once and indexed by id, for variant (b) rows."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, tuple[Path, dict[int, Row]] | None] = {}

    def get(self, kind: str) -> tuple[Path, dict[int, Row]] | None:
        if kind not in self._cache:
            path = self.root / f"all_{kind}.json"
            self._cache[kind] = (path, _index_rows(path, kind, complete=None)) if path.is_file() else None
        return self._cache[kind]


def _complete(row: Row, rid: int, kind: str, path: Path, where: str, complements: _Complements) -> Row:
    """Fill the fields a split row lacks from all_<kind>.json; split-file values win."""
    missing = [f for f in REQUIRED[kind] if f not in row]
    if missing:
        found = complements.get(kind)
        if found is None:
            raise DataFormatError(path, f"{where}.{missing[0]}", f"missing, and no all_{kind}.json to complete it")
        all_path, index = found
        if rid not in index:
            raise DataFormatError(all_path, f"{kind}.id", f"no entry with id {rid} (needed by {path.name})")
        row = {**index[rid], **row}
    for name, kind_type in REQUIRED[kind].items():
        require(row, name, path, where, kind_type)
    return row


def _index_rows(path: Path, kind: str, complete: _Complements | None) -> dict[int, Row]:
    """Rows of one file by id; completed (and type-checked) when `complete` is given."""
    rows = require(read_json(path), kind, path, kind=list)
    index: dict[int, Row] = {}
    for i, row in enumerate(rows):
        where = f"{kind}[{i}]"
        rid = require(row, "id", path, where, int)
        if rid in index:
            raise DataFormatError(path, f"{where}.id", f"duplicate id {rid}")
        index[rid] = _complete(row, rid, kind, path, where, complete) if complete else row
    return index


def _read_split(
    benchmark: str, root: Path, split: str, complements: _Complements, report: ReadReport
) -> list[VQASample]:
    tables: dict[str, dict[int, Row]] = {}
    for kind in KINDS:
        tables[kind] = _index_rows(split_file(benchmark, root, split, kind), kind, complements)
        inactive = sum(1 for row in tables[kind].values() if not row["active"])
        if inactive:
            report.skip(f"inactive {kind[:-1]}", inactive, split=split)
    images, answers = tables["images"], tables["answers"]
    q_path, a_path = split_file(benchmark, root, split, "questions"), split_file(benchmark, root, split, "answers")
    image_dir = root / LAYOUTS[benchmark][1]
    samples = []
    for qid in sorted(tables["questions"]):  # id order: independent of list order and variant
        q = tables["questions"][qid]
        if not q["active"]:
            continue  # counted above as an inactive question
        image = images.get(q["img_id"])
        if image is None:
            report.skip("question whose image is not in the split", split=split)
            continue
        if not image["active"]:
            report.skip("question of an inactive image", split=split)
            continue
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in q["answers_ids"]):
            raise DataFormatError(q_path, f"questions[id={qid}].answers_ids", "expected a list of integer ids")
        answer = next((answers[a] for a in q["answers_ids"] if a in answers and answers[a]["active"]), None)
        if answer is None:
            report.skip("question without an active answer", split=split)
            continue
        if answer.get("question_id", qid) != qid:
            raise DataFormatError(
                a_path, f"answers[id={answer['id']}].question_id", f"is {answer['question_id']}, but question {qid} lists it"
            )
        image_path = image_dir / f"{q['img_id']}.tif"
        if not image_path.is_file():
            report.skip("missing image file", split=split)
            continue
        samples.append(
            VQASample(
                benchmark, split, str(qid), image_path,
                question=q["question"].strip(), answer=str(answer["answer"]).strip(), question_type=q["type"],
            )
        )
    return samples


def read_rsvqa(
    benchmark: str, root: Path, splits: Sequence[str] | None = None
) -> tuple[list[VQASample], ReadReport]:
    """Read the asked splits (default: all whose files exist); samples by split, then question id."""
    if splits is None:
        splits = available_splits(benchmark, root)
    report = ReadReport(benchmark)
    complements = _Complements(root)
    samples: list[VQASample] = []
    for split in splits:
        for kind in KINDS:
            if not (path := split_file(benchmark, root, split, kind)).is_file():
                raise FileNotFoundError(f"{path}: RSVQA split file not found")
        part = _read_split(benchmark, root, split, complements, report)
        report.kept[split] += len(part)
        samples.extend(part)
    return samples, report
