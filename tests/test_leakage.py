"""Leakage across sources: the pHash index, the hash cache, and a planted cross-source
near-duplicate (a test image re-encoded and resized into another benchmark's training
images) that the builder drops, or, with action=fail, that the gate fails on, naming the pair.
Real PIL, imagehash, SQLite, Great Expectations and MLflow; no mocks."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from projects import project_environment

from skyeye.config import LeakageConfig, get_settings
from skyeye.data.instructions import build
from skyeye.datagate.gate import run_gate
from skyeye.datagate.leakage import CACHE_FILE, LEAKAGE_FILE, BandIndex, HashCache, find_leaks
from skyeye.tracking import runs

BITS = 8  # the index tests: 9 exact bands at radius 0, 3 bands at radius 2


def _flip(h: int, n: int, rng: np.random.Generator) -> int:
    for b in rng.choice(64, n, replace=False):
        h ^= 1 << int(b)
    return h


@pytest.mark.parametrize("radius", [0, 2])  # the brief's bits+1 exact bands, and the default
def test_band_index_finds_every_pair_within_the_threshold_and_none_beyond(radius):
    rng = np.random.default_rng(7)
    base = [int(v) for v in rng.integers(0, 2**63, 5000, dtype=np.int64)]
    queries, planted = [], {}
    for q in range(200):  # query q is base[q] with q % 13 bits flipped: 0..12, the threshold is 8
        queries.append(_flip(base[q], q % 13, rng))
        planted[q] = q % 13
    index = BandIndex(np.array(base, np.uint64), BITS, radius=radius)
    qi, ci, dist = index.query(np.array(queries, np.uint64))
    found = set(zip(qi.tolist(), ci.tolist(), strict=True))
    brute = {(q, c) for q in range(len(queries)) for c in range(len(base))
             if (queries[q] ^ base[c]).bit_count() <= BITS}
    assert found == brute
    assert {(q, q) for q, n in planted.items() if n <= BITS} <= found
    assert not {(q, q) for q, n in planted.items() if n > BITS} & found
    assert dist.max() <= BITS and set(dist.tolist()) == set(range(BITS + 1))


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)  # smooth random fields: distinct images, stable pHashes
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 96), Image.BICUBIC).save(path)


def test_hash_cache_keys_by_content_so_a_second_run_hashes_nothing(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        _image(imgs / f"{i}.png", i)
    shutil.copy(imgs / "0.png", imgs / "copy-of-0.png")  # same bytes, another path: hashed once
    media = {str(p): "image" for p in sorted(imgs.iterdir())}
    db = tmp_path / "state" / "hash_cache.sqlite"
    first = HashCache(db)
    hashes = first.hash_media(media)
    assert first.computed == 4 and len(hashes) == 5
    assert hashes[str(imgs / "0.png")] == hashes[str(imgs / "copy-of-0.png")]
    again = HashCache(db)  # a later run: a new object, the same file
    assert again.hash_media(media) == hashes and again.computed == 0
    _image(imgs / "4.png", 4)  # a new data version adds one image: only it is hashed
    newer = HashCache(db)
    newer.hash_media({**media, str(imgs / "4.png"): "image"})
    assert newer.computed == 1


def test_perceptual_hash_is_imagehash_phash_within_two_bits_and_exact_below_the_reducing_gap():
    import imagehash

    from skyeye.monitoring.signals import hamming, perceptual_hash
    rng = np.random.default_rng(3)
    for seed in range(10):  # DIOR-sized scenes: reduced by 8 before Lanczos, as PIL's thumbnails are
        small = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        big = np.asarray(Image.fromarray(small).resize((800, 800), Image.BICUBIC), np.int16)
        im = Image.fromarray(np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8))
        assert hamming(perceptual_hash(im), str(imagehash.phash(im))) <= 2
    tile = Image.fromarray(rng.integers(0, 255, (150, 150, 3), dtype=np.uint8))  # under 2 x 3 x 32: no reduction
    assert perceptual_hash(tile) == str(imagehash.phash(tile))
    assert perceptual_hash(tile.convert("P")) == perceptual_hash(tile.convert("P").convert("RGB"))


def test_hash_cache_never_reads_a_hash_of_an_older_phash_version(tmp_path):
    import sqlite3

    from skyeye.datagate.leakage import content_sha256
    _image(tmp_path / "a.png", 0)
    db = tmp_path / "hash_cache.sqlite"
    with sqlite3.connect(db) as old:  # version 1's table, as caches written before version 2 hold it
        old.execute("CREATE TABLE phash (sha256 TEXT PRIMARY KEY, phash TEXT)")
        old.execute("INSERT INTO phash VALUES (?, ?)", (content_sha256(str(tmp_path / "a.png")), "0" * 16))
    old.close()
    cache = HashCache(db)
    (sha, phash), = cache.hash_media({str(tmp_path / "a.png"): "image"}).values()
    assert cache.computed == 1 and phash != "0" * 16


def _reencode(src: Path, scale: float, dst: Path) -> None:
    """JPEG at quality 70, then resized by `scale`, then saved in the destination's format."""
    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, "JPEG", quality=70)
    im = Image.open(io.BytesIO(buf.getvalue()))
    im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR).save(dst)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_synth: Path, tiny_instructions: Path) -> tuple[Path, str]:
    """tiny_synth with ucm_captions' train image 1.tif replaced by a re-encoded (JPEG q70) and
    enlarged (160%) copy of the first image of the rsvqa_lr test split: a cross-source leak."""
    root = tmp_path_factory.mktemp("planted") / "synth"
    shutil.copytree(tiny_synth, root)
    clean = tiny_instructions
    lr_test = json.loads((clean / "eval/rsvqa_lr_test.json").read_text())["samples"][0]
    _reencode(clean / "eval" / lr_test["image"], 1.6, root / "ucm_captions/imgs/1.tif")
    return root, lr_test["id"]


def _uses(samples: list[dict], name: str) -> list[str]:
    return [s["id"] for s in samples if s.get("image", "").endswith(name)]


def test_builder_drops_the_training_samples_of_a_planted_near_duplicate(planted, tiny_instructions, tmp_path):
    root, test_id = planted
    clean_stage1 = json.loads((tiny_instructions / "stage1.json").read_text())
    leaked_ids = _uses(clean_stage1, "ucm_captions/imgs/1.tif")
    assert leaked_ids  # the planted image is trained on before the check
    out = tmp_path / "instructions"
    card = build(root, out, leakage=LeakageConfig(action="drop"))  # the shipped threshold
    pairs = json.loads((out / LEAKAGE_FILE).read_text())["pairs"]
    assert pairs == card["leakage"]["pairs"] and pairs
    for p in pairs:  # every pair is the planted one: the rsvqa_lr test image ~ a ucm_captions sample
        assert (p["benchmark"], p["train_source"], p["exact"]) == ("rsvqa_lr", "ucm_captions", False)
        assert p["test_file"] == "eval/rsvqa_lr_test.json" and p["train_path"].endswith("ucm_captions/imgs/1.tif")
        assert 0 <= p["distance"] <= LeakageConfig().near_duplicate_bits
    assert any(p["test_id"] == test_id for p in pairs)
    assert {p["train_id"] for p in pairs} >= set(leaked_ids)
    stage1 = json.loads((out / "stage1.json").read_text())
    stage2 = json.loads((out / "stage2.json").read_text())
    assert _uses(stage1, "ucm_captions/imgs/1.tif") == [] and _uses(stage2, "ucm_captions/imgs/1.tif") == []
    dropped = card["leakage"]["dropped"]
    assert dropped["stage1.json"] == len(leaked_ids) and len(stage1) == len(clean_stage1) - len(leaked_ids)
    assert card["stage1"]["total"] == len(stage1)
    assert "rsvqa_lr" in (out / "DATA_CARD.md").read_text().split("## Leakage across sources")[1]
    assert find_leaks(out, LeakageConfig()) == []  # what the gate re-checks


def test_with_action_fail_the_gate_fails_naming_the_pair(planted, tmp_path, monkeypatch):
    """The gate as the platform runs it (`run_gate`: the project's config, its hash cache,
    a real MLflow store): it fails, names the pair, and stores every pair as an artifact."""
    root, test_id = planted
    out = tmp_path / "instructions"
    card = build(root, out, leakage=LeakageConfig(action="fail"))
    assert card["leakage"]["dropped"] == {} and card["leakage"]["pairs"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/data.yaml").write_text("leakage: {near_duplicate_bits: 6, action: fail}\n")
    with project_environment(tmp_path, monkeypatch, store=True):
        result, run_id = run_gate(out)
        assert not result.success
        assert [f.column for f in result.failures] == ["train_id"], result.render()
        example = result.failures[0].examples[0]
        assert (example["file"], example["id"], example["train_source"]) == ("eval/rsvqa_lr_test.json", test_id,
                                                                             "ucm_captions")
        assert example["distance"] <= 6 and example["train_id"].startswith("s1-ucm_captions")
        assert {(x["benchmark"], x["train_source"], x["exact"]) for x in result.leaks} == \
            {("rsvqa_lr", "ucm_captions", False)}  # other bytes, another path: found by the pHash
        assert "pHash" in result.render() and test_id in result.render()
        client = runs.client()
        stored = json.loads(Path(client.download_artifacts(run_id, LEAKAGE_FILE, str(tmp_path))).read_text())
        assert stored["pairs"] == result.leaks
        assert client.get_run(run_id).data.metrics["leak_pairs"] == len(result.leaks)
        assert result.hashes_computed > 0
        cache = HashCache(get_settings().state / CACHE_FILE)  # the gate's cache: a second run hashes nothing
        find_leaks(out, LeakageConfig(), cache)
        assert cache.computed == 0
