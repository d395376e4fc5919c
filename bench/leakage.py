"""Benchmark of the leakage check (skyeye/datagate/leakage.py). Prints JSON:

- pHash distances on the corpus: between distinct images (all pairs), and between images and
  planted copies re-encoded as JPEG q=70 and resized by 50-200% (what the default threshold,
  `near_duplicate_bits`, is chosen from; docs/data.md);
- the gate's time without the check (same-path leakage only), with it and a cold hash cache,
  and with it and a warm cache (medians of `--repeats`);
- hashing throughput (images/s), cold and cached;
- the index at 1M random 64-bit hashes: build time and time per query, radius 0 (threshold + 1 exact
  bands of the pigeonhole argument) and 2 (3 bands, neighbours within 2 bits: the default);
- the projection for SkyEye-968k (968k training images).

    python bench/leakage.py [--synth /tmp/leak-demo/synth] [--scale demo] [--repeats 3]

Runs in a temporary folder (a given --synth is only read): data/ and MLflow are not touched.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from data_steps import timed  # bench/ is the script's folder: its sibling's timer
from PIL import Image

from skyeye.config import SCALE_NAMES, LeakageConfig
from skyeye.data.instructions import build
from skyeye.datagate.expectations import validate
from skyeye.datagate.leakage import BandIndex, HashCache, find_leaks, references, to_int
from skyeye.monitoring.signals import perceptual_hash
from skyeye.synth.corpus import synthesize

SKYEYE_968K = 968_000  # training images of the paper's instruction set, as the issue sizes it
QUERIES = 10_000


def distinct_distances(hashes: list[int]) -> np.ndarray:
    """Hamming distance of every pair of distinct hashes' images, as a histogram over 0..64."""
    h = np.array(hashes, np.uint64)
    hist = np.zeros(65, np.int64)
    for i in range(len(h) - 1):
        hist += np.bincount(np.bitwise_count(h[i + 1:] ^ h[i]), minlength=65)
    return hist


def planted_distances(paths: list[str], n: int, seed: int) -> tuple[list[int], dict[str, dict[int, int]]]:
    """Distance between an image and its copy re-encoded (JPEG q=70) and resized by a factor
    drawn from 0.5-2.0; also the worst case at each end of the range."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(n, len(paths)), replace=False)
    out, ends = [], {"0.5": [], "2.0": []}

    def copy(im: Image.Image, scale: float) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
        re = Image.open(io.BytesIO(buf.getvalue()))
        return re.resize((max(8, round(re.width * scale)), max(8, round(re.height * scale))), Image.BILINEAR)

    for i in chosen:
        with Image.open(paths[i]) as src:
            im = src.convert("RGB")
        h = perceptual_hash(im)
        out.append(bin(to_int(h) ^ to_int(perceptual_hash(copy(im, float(rng.uniform(0.5, 2.0)))))).count("1"))
        for key in ends:
            ends[key].append(bin(to_int(h) ^ to_int(perceptual_hash(copy(im, float(key))))).count("1"))
    return out, {k: {d: v.count(d) for d in sorted(set(v))} for k, v in ends.items()}


def index_at_scale(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    queries = rng.integers(0, 2**64 - 1, QUERIES, dtype=np.uint64, endpoint=True)
    queries[:100] = base[:100] ^ np.uint64(0b1011_0110)  # 5 bits off: must be found
    out = {}
    for radius in (0, 2):
        start = time.perf_counter()
        index = BandIndex(base, LeakageConfig().near_duplicate_bits, radius=radius)
        built = time.perf_counter() - start
        start = time.perf_counter()
        qi, ci, _ = index.query(queries)
        queried = time.perf_counter() - start
        found = set(zip(qi.tolist(), ci.tolist(), strict=True))
        out[f"radius_{radius}"] = {"bands": len(index.bands), "build_s": round(built, 2),
                                   "query_us_per_hash": round(queried / QUERIES * 1e6, 1),
                                   "planted_found": sum((i, i) in found for i in range(100)), "pairs": len(found)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", type=Path, help="an existing SkyEye-Synth folder (default: synthesize one)")
    parser.add_argument("--scale", default="demo", choices=SCALE_NAMES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--planted", type=int, default=1000, help="images copied for the planted distances")
    parser.add_argument("--index-size", type=int, default=1_000_000)
    args = parser.parse_args()
    cfg = LeakageConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth = args.synth or tmp / "synth"
        if not args.synth:
            synthesize(synth, scale=args.scale, progress=False)
        # every training sample kept (action fail): the distances and what each threshold flags
        kept = tmp / "instructions-all"
        build(synth, kept, leakage=LeakageConfig(action="fail"))
        inst = tmp / "instructions"  # the default (drop): what the gate is timed on
        card = build(synth, inst, leakage=cfg)
        train, test = references(kept)
        media = {r.media: r.kind for r in (*train, *test)}

        cold_cache = HashCache(tmp / "cold.sqlite")
        start = time.perf_counter()
        hashed = cold_cache.hash_media(media)
        cold_s = time.perf_counter() - start
        warm = HashCache(tmp / "cold.sqlite")
        start = time.perf_counter()
        warm.hash_media(media)
        warm_s = time.perf_counter() - start
        mean_bytes = statistics.mean(Path(p).stat().st_size for p in media)

        by_sha = {sha: h for sha, h in hashed.values() if h}
        hist = distinct_distances([to_int(h) for h in by_sha.values()])
        images = sorted(p for p, k in media.items() if k == "image")
        planted, ends = planted_distances(images, args.planted, seed=0)

        def gate(near: bool, cache: Path | None):
            return validate(inst, tmp / "gx", leakage=cfg, hash_cache=cache, near_duplicates=near)

        gate(True, tmp / "gate-warm.sqlite")  # fills the warm cache (and GX's context)
        off_all, cold_runs, warm_all, alone_cold, alone_warm = [], [], [], [], []
        for i in range(args.repeats):  # interleaved, so a busy spell on the shared machine hits all three
            _, (t,), result = timed(lambda: gate(False, None), 1)
            off_all.append(t)
            _, (t,), _ = timed(lambda i=i: gate(True, tmp / f"gate-cold-{i}.sqlite"), 1)  # every image hashed
            cold_runs.append(t)
            _, (t,), checked = timed(lambda: gate(True, tmp / "gate-warm.sqlite"), 1)
            warm_all.append(t)
            # the check alone (what the gate adds): read the files, sha256 every image, index, query
            _, (t,), _ = timed(lambda i=i: find_leaks(inst, cfg, HashCache(tmp / f"alone-cold-{i}.sqlite")), 1)
            alone_cold.append(t)
            _, (t,), _ = timed(lambda: find_leaks(inst, cfg, HashCache(tmp / "gate-warm.sqlite")), 1)
            alone_warm.append(t)
        off_s, warm_gate_s = statistics.median(off_all), statistics.median(warm_all)
        index = index_at_scale(args.index_size, seed=1)
        # what each threshold flags on the clean corpus (distinct images: false positives) and drops
        by_threshold = {}
        for bits in (4, 6, 8):
            leaks = find_leaks(kept, LeakageConfig(near_duplicate_bits=bits), warm)
            by_threshold[bits] = {"pairs": len(leaks), "image_pairs": len({(x.test_path, x.train_path) for x in leaks}),
                                  "training_samples": len({(x.train_file, x.train_index) for x in leaks})}

    cum = np.cumsum(hist)
    pairs = int(cum[-1])
    rate_cold, rate_warm = len(media) / cold_s, len(media) / warm_s
    per_q = index["radius_2"]["query_us_per_hash"] * 1e-6
    print(json.dumps({
        "scale": args.scale if not args.synth else f"given: {args.synth}", "repeats": args.repeats,
        "media": len(media), "distinct_contents": len(by_sha), "mean_file_bytes": round(mean_bytes),
        "stage1": card["stage1"]["total"], "stage2": card["stage2"]["total"],
        "clean_corpus_leak_pairs": len(card["leakage"]["pairs"]),
        "distinct_pairs": pairs, "distinct_min_distance": int(np.nonzero(hist)[0][0]),
        "distinct_pairs_within": {k: int(cum[k]) for k in (4, 6, 8, 10, 12, 14, 16)},
        "distinct_distance_percentiles": {p: int(np.searchsorted(cum, pairs * p / 100)) for p in (0.001, 0.01, 1, 50)},
        "planted_n": len(planted), "planted_max": max(planted), "planted_p99": float(np.percentile(planted, 99)),
        "planted_histogram": {d: planted.count(d) for d in sorted(set(planted))},
        "planted_histogram_at_scale": ends, "near_duplicate_bits": cfg.near_duplicate_bits,
        "clean_corpus_flagged_by_threshold": by_threshold,
        "gate_without_check_s": round(off_s, 2),
        "gate_with_check_cold_cache_s": round(statistics.median(cold_runs), 2),
        "gate_with_check_warm_cache_s": round(warm_gate_s, 2),
        "check_overhead_cold": round(statistics.median(cold_runs) / off_s - 1, 3),
        "check_overhead_warm": round(warm_gate_s / off_s - 1, 3),
        "check_alone_cold_cache_s": round(statistics.median(alone_cold), 2),
        "check_alone_warm_cache_s": round(statistics.median(alone_warm), 2),
        "check_alone_warm_share_of_gate": round(statistics.median(alone_warm) / off_s, 3),
        "gate_records": result.n_records, "gate_passed_with_check": checked.success,
        "hash_images_per_s_cold": round(rate_cold, 1), "hash_images_per_s_cached": round(rate_warm, 1),
        "index_1m": index, "index_size": args.index_size,
        "projection_968k": {
            "hash_cold_min": round(SKYEYE_968K / rate_cold / 60, 1),
            "hash_cached_min": round(SKYEYE_968K / rate_warm / 60, 1),
            "index_build_s": round(index["radius_2"]["build_s"] * SKYEYE_968K / args.index_size, 1),
            "query_s_per_10k_test_images": round(per_q * 10_000 * SKYEYE_968K / args.index_size, 2),
            "note": f"at this corpus's mean file size ({round(mean_bytes)} B); cached time is reading "
                    "and sha256 of every file, which grows with file size"},
        "runs_s": {"without": [round(t, 2) for t in off_all], "cold": [round(t, 2) for t in cold_runs],
                   "warm": [round(t, 2) for t in warm_all], "alone_cold": [round(t, 2) for t in alone_cold],
                   "alone_warm": [round(t, 2) for t in alone_warm]},
    }, indent=1))


if __name__ == "__main__":
    main()
