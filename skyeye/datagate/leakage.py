"""Leakage across sources: a test (or validation) image of any benchmark that a training
instruction of any source also uses, as the same bytes or as a near-duplicate.

Real benchmarks share imagery (DIOR-RSVG is cut from DIOR, instruction sets re-use
benchmark train images, one tile sits in two sets), so a path check is not enough:
- exact: the same file content (sha256 of the bytes), whatever the path;
- near-duplicate: perceptual hashes (`monitoring.signals.perceptual_hash`, 64-bit pHash)
  at most `near_duplicate_bits` apart, which survives re-encoding and resizing.
A video is hashed by its first decoded frame (a clip re-used whole shares it; one trimmed
differently is not found). The rules and the default threshold: docs/data.md.

Hashes are cached by content sha256 in a SQLite file under the state folder, so a new data
version hashes only its new images. `find_leaks` compares through `BandIndex`, never all pairs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import DataConfig, LeakageConfig, Settings, load_yaml_config
from ..formats.benchmarks import EVAL_DIR, VALIDATION_DIR
from ..monitoring.signals import HASH_BITS, PHASH_VERSION, perceptual_hash

LEAKAGE_FILE = "leakage.json"  # every pair the builder found, beside stage1.json
CACHE_FILE = "hash_cache.sqlite"  # under Settings.state
DATA_CONFIG = "configs/data.yaml"  # where `leakage:` is read from, relative to the project root
STAGE_FILES = ("stage1.json", "stage2.json")


def configured(settings: Settings) -> tuple[LeakageConfig, Path]:
    """The project's leakage rules (configs/data.yaml, defaults if absent) and hash cache file."""
    path = settings.project_root / DATA_CONFIG
    cfg = load_yaml_config(path, DataConfig).leakage if path.exists() else LeakageConfig()
    return cfg, settings.state / CACHE_FILE


@dataclass(frozen=True)
class Ref:
    """One use of a media file in an instruction or eval file."""
    file: str  # relative to the instruction folder: stage1.json, eval/ucm_captions_test.json
    index: int  # record index in that file
    id: str
    group: str  # training: the sample's source; test: the eval file's benchmark
    path: str  # as written in the record
    media: str  # normalised path on disk
    kind: str  # image | video


@dataclass(frozen=True)
class Leak:
    """A test image and a training sample that uses it (or a near-duplicate of it)."""
    test_file: str
    test_index: int
    test_id: str
    benchmark: str
    test_path: str
    train_file: str
    train_index: int
    train_id: str
    train_source: str
    train_path: str
    distance: int  # pHash bits apart; 0 for the same bytes
    exact: bool  # same file content (sha256)

    def render(self) -> str:
        how = "same bytes" if self.exact else f"pHash {self.distance} bits apart"
        return (f"{self.test_file}[{self.test_index}] {self.test_id} ({self.benchmark}, {self.test_path}) ~ "
                f"{self.train_file}[{self.train_index}] {self.train_id} ({self.train_source}, {self.train_path}): "
                f"{how}")


def references(folder: Path) -> tuple[list[Ref], list[Ref]]:
    """(training refs, test refs) of an instruction folder: stage files; eval/ and validation/.
    Tolerant: unreadable files and malformed records are skipped (the gate reports them)."""
    folder = Path(folder)
    train: list[Ref] = []
    for name in STAGE_FILES:
        data = _load(folder / name)
        for i, rec in enumerate(data if isinstance(data, list) else []):
            if ref := _ref(rec, name, i, str(folder), "source"):
                train.append(ref)
    test: list[Ref] = []
    for path in [*sorted((folder / EVAL_DIR).glob("*.json")), *sorted((folder / VALIDATION_DIR).glob("*.json"))]:
        data = _load(path)
        if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
            continue
        for i, rec in enumerate(data["samples"]):
            if isinstance(rec, dict) and (ref := _ref({**rec, "benchmark": data.get("benchmark")},
                                                     path.relative_to(folder).as_posix(), i, str(path.parent),
                                                     "benchmark")):
                test.append(ref)
    return train, test


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _ref(rec: Any, file: str, index: int, base: str, group: str) -> Ref | None:
    if not isinstance(rec, dict):
        return None
    kind = "video" if "video" in rec else "image"
    path = rec.get(kind)
    if not isinstance(path, str) or not path:
        return None
    return Ref(file, index, str(rec.get("id")), str(rec.get(group)), path,
               os.path.normpath(os.path.join(base, path)), kind)


# ---------------------------------------------------------------- hashing and its cache
def content_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def media_phash(path: str, kind: str) -> str | None:
    """pHash of an image, or of a video's first decoded frame; None if it does not decode
    (the gate's `images` table reports why)."""
    try:
        if kind == "video":
            import av  # only CapERA has videos

            with av.open(path) as container:
                frame = next(container.decode(video=0))
                return perceptual_hash(frame.to_image())
        with Image.open(path) as im:
            return perceptual_hash(im)
    except Exception:  # noqa: BLE001 - an undecodable file has no hash; it is a finding elsewhere
        return None


class HashCache:
    """content sha256 -> pHash, in SQLite (`path`) or in memory (None). Each write is one
    transaction, so a crash leaves the file as it was; `computed` counts the pHashes this
    object had to compute (a second run over the same data computes none). One table per
    `PHASH_VERSION`, so hashes of an older pHash are never read as current ones."""

    TABLE = f"phash_v{PHASH_VERSION}"

    def __init__(self, path: Path | None):
        self.path, self.computed = path, 0
        self._memory: dict[str, str | None] = {}
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.TABLE} (sha256 TEXT PRIMARY KEY, phash TEXT)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction (committed, or rolled back on error), then the connection closed."""
        db = sqlite3.connect(self.path, timeout=60)  # waits while another build or gate writes
        try:
            with db:
                yield db
        finally:
            db.close()

    def get(self, shas: list[str]) -> dict[str, str | None]:
        if self.path is None:
            return {s: self._memory[s] for s in shas if s in self._memory}
        out: dict[str, str | None] = {}
        with self._connect() as db:
            for i in range(0, len(shas), 500):  # below SQLite's bound-parameter limit
                chunk = shas[i:i + 500]
                marks = ",".join("?" * len(chunk))
                out.update(db.execute(f"SELECT sha256, phash FROM {self.TABLE} WHERE sha256 IN ({marks})", chunk))
        return out

    def put(self, rows: dict[str, str | None]) -> None:
        if self.path is None:
            self._memory.update(rows)
            return
        with self._connect() as db:  # one transaction: all rows or none
            db.executemany(f"INSERT OR REPLACE INTO {self.TABLE} VALUES (?, ?)", rows.items())

    def hash_media(self, media: dict[str, str], workers: int | None = None) -> dict[str, tuple[str, str | None]]:
        """media path -> kind  =>  path -> (sha256, pHash or None); missing files are left out."""
        n = workers or min(8, (os.cpu_count() or 1) + 2)
        paths = list(media)
        with ThreadPoolExecutor(max_workers=n) as pool:  # hashlib and PIL release the GIL
            shas = dict(zip(paths, pool.map(content_sha256, paths), strict=True))
            known = self.get(sorted({s for s in shas.values() if s}))
            todo: dict[str, str] = {}  # sha -> one path with that content
            for p, s in shas.items():
                if s and s not in known:
                    todo.setdefault(s, p)
            new = dict(zip(todo, pool.map(lambda s: media_phash(todo[s], media[todo[s]]), todo), strict=True))
        if new:
            self.put(new)
            self.computed += len(new)
        known |= new
        return {p: (s, known[s]) for p, s in shas.items() if s}


# ---------------------------------------------------------------- the index
def to_int(phash: str) -> int:
    return int(phash, 16)


class BandIndex:
    """Multi-index hashing (Norouzi et al.): the 64 bits cut into m bands. Two hashes at most
    `bits` apart differ in at most `bits` bits, so by pigeonhole some band differs in at most
    `radius` = bits // m bits when m = bits // (radius + 1) + 1. With radius 0 that is
    bits + 1 bands, one of which a near pair shares exactly; a query then looks up only the
    hashes equal to it on some band (a binary search in each band's sorted keys), or, with
    radius r, within r bits of it on a band (its few neighbour keys), and checks just those.
    Build is a sort, O(n log n); a query inspects about m * lookups * n / 2**(64 / m)
    candidates for uniform hashes, not all n (bench/leakage.py measures both radii at 1M)."""

    def __init__(self, hashes: np.ndarray, bits: int, radius: int = 2):
        self.hashes, self.bits, self.radius = np.asarray(hashes, dtype=np.uint64), bits, min(radius, bits)
        m = bits // (self.radius + 1) + 1
        edges = np.linspace(0, HASH_BITS, m + 1).round().astype(int)
        self.bands = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        self.sorted: list[tuple[np.ndarray, np.ndarray]] = []  # per band: (sorted keys, their rows)
        self.flips: list[np.ndarray] = []  # per band: every mask of at most `radius` bits
        for lo, hi in self.bands:
            keys = self._keys(self.hashes, lo, hi)
            order = np.argsort(keys, kind="stable")
            self.sorted.append((keys[order], order))
            masks = [sum(1 << b for b in c) for k in range(self.radius + 1)
                     for c in itertools.combinations(range(hi - lo), k)]
            self.flips.append(np.array(masks, dtype=np.uint64))

    @staticmethod
    def _keys(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
        mask = np.uint64((1 << (hi - lo)) - 1)
        return (hashes >> np.uint64(lo)) & mask

    def query(self, queries: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, indexed row, distance) of every pair at most `bits` apart, each once."""
        queries = np.asarray(queries, dtype=np.uint64)
        found = [np.zeros((0, 2), np.int64)]
        for start in range(0, len(queries), chunk):
            q = queries[start:start + chunk]
            qi, ci = [], []
            for (lo, hi), (keys, order), flips in zip(self.bands, self.sorted, self.flips, strict=True):
                k = (self._keys(q, lo, hi)[:, None] ^ flips[None, :]).ravel()
                left, right = np.searchsorted(keys, k, "left"), np.searchsorted(keys, k, "right")
                counts = right - left
                rows = np.repeat(np.arange(len(q)).repeat(len(flips)), counts)
                # positions left[i] .. right[i]-1 of each lookup i, flattened
                offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
                qi.append(rows)
                ci.append(order[np.repeat(left, counts) + offsets])
            qi_all, ci_all = np.concatenate(qi), np.concatenate(ci)
            keep = np.bitwise_count(q[qi_all] ^ self.hashes[ci_all]) <= self.bits
            found.append(np.unique(np.stack([qi_all[keep] + start, ci_all[keep]], axis=1), axis=0))
        pairs = np.concatenate(found)
        dist = np.bitwise_count(queries[pairs[:, 0]] ^ self.hashes[pairs[:, 1]]).astype(int)
        return pairs[:, 0], pairs[:, 1], dist


# ---------------------------------------------------------------- the check
def find_leaks(folder: Path, cfg: LeakageConfig, cache: HashCache | None = None) -> list[Leak]:
    """Every (test image use, training sample) pair of `folder` whose media are the same
    bytes or pHash-near; one pair per eval file and test image (its first use) and per
    training sample. Sorted, so the report is the same on every run."""
    cache = cache or HashCache(None)
    train, test = references(folder)
    media = {r.media: r.kind for r in (*train, *test)}
    hashed = cache.hash_media(media)
    test_first: dict[tuple[str, str], Ref] = {}
    for r in test:
        test_first.setdefault((r.file, r.media), r)
    by_train_media: dict[str, list[Ref]] = defaultdict(list)
    for r in train:
        by_train_media[r.media].append(r)
    train_media = [m for m in by_train_media if m in hashed]
    test_media = sorted({m for _, m in test_first if m in hashed})
    matches: dict[tuple[str, str], tuple[int, bool]] = {}  # (test media, train media) -> (distance, exact)
    by_sha: dict[str, list[str]] = defaultdict(list)
    for m in train_media:
        by_sha[hashed[m][0]].append(m)
    for t in test_media:
        for m in by_sha.get(hashed[t][0], ()):
            matches[(t, m)] = (0, True)
    train_h = [m for m in train_media if hashed[m][1]]
    test_h = [t for t in test_media if hashed[t][1]]
    if train_h and test_h:
        index = BandIndex(np.array([to_int(hashed[m][1]) for m in train_h], np.uint64), cfg.near_duplicate_bits)
        qs, cs, ds = index.query(np.array([to_int(hashed[t][1]) for t in test_h], np.uint64))
        for q, c, d in zip(qs.tolist(), cs.tolist(), ds.tolist(), strict=True):
            matches.setdefault((test_h[q], train_h[c]), (d, False))
    test_by_media: dict[str, list[Ref]] = defaultdict(list)
    for (_, m), r in test_first.items():
        test_by_media[m].append(r)
    leaks = [Leak(t.file, t.index, t.id, t.group, t.path, r.file, r.index, r.id, r.group, r.path, d, exact)
             for (tm, rm), (d, exact) in matches.items() for t in test_by_media[tm] for r in by_train_media[rm]]
    return sorted(leaks, key=lambda x: (x.test_file, x.test_index, x.train_file, x.train_index))


def drop_leaked(stages: dict[str, list[dict]], leaks: list[Leak]) -> dict[str, int]:
    """Remove, in place, the training samples of `stages` (stage file name -> samples) that a
    leak names; returns how many each file lost."""
    gone = {(x.train_file, x.train_index) for x in leaks}
    dropped = {}
    for name, samples in stages.items():
        kept = [s for i, s in enumerate(samples) if (name, i) not in gone]
        dropped[name] = len(samples) - len(kept)
        samples[:] = kept
    return dropped


def leak_report(leaks: list[Leak], cfg: LeakageConfig, dropped: dict[str, int] | None = None) -> dict[str, Any]:
    """What `leakage.json` (and the MLflow artifact of the same name) holds."""
    return {"near_duplicate_bits": cfg.near_duplicate_bits, "action": cfg.action,
            "pairs": [asdict(x) for x in leaks], "dropped": dropped or {}}


def leak_lines(report: dict[str, Any] | None, shown: int = 20) -> list[str]:
    """The data card's section on leakage (DATA_CARD.md): the rule, what was dropped, pairs."""
    if report is None:
        return []
    pairs = report["pairs"]
    rule = (f"same bytes, or pHash at most {report['near_duplicate_bits']} bits apart; "
            f"action: {report['action']}")
    lines = ["", "## Leakage across sources (eval/validation images among the training images)", "",
             f"Rule: {rule}. Pairs found: {len(pairs)}."]
    if report["dropped"]:
        lines.append("Training samples dropped: " + ", ".join(f"{k} {n}" for k, n in report["dropped"].items()) + ".")
    if pairs:
        lines += ["", f"First {min(shown, len(pairs))} pairs (all in {LEAKAGE_FILE}; "
                      "a training index is the sample's place as built, before the drop):", ""]
        lines += [f"- {Leak(**p).render()}" for p in pairs[:shown]]
    return lines
