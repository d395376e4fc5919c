"""The inference log's writer (skyeye/serving/inference_log.py) on real folders, read back
with the shared reader, and `skyeye log tail|stats` over what it wrote. The served path
(rows of real requests, a refusing store under load, the flush at Ctrl-C) is in
tests/test_serving.py."""
from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from skyeye.monitoring.log_schema import read_log
from skyeye.monitoring.signals import perceptual_hash
from skyeye.serving.config import InferenceLogConfig, ServeConfig
from skyeye.serving.inference_log import InferenceLog, identifier_of, metrics

QUESTION = "[refer] the red ship"


def _row(i: int = 0, time_: datetime | None = None, **kw) -> dict:
    return {"time": time_ or datetime.now(UTC), "request_id": f"chatcmpl-{i}", "model": "skyeyegpt", "version": 1,
            "role": "production", "task": "refer", "prompt": QUESTION, "prompt_chars": len(QUESTION),
            "prompt_tokens": 40, "image_signature": [float(i)] * 16, "answer": "{<10><20><30><40>}",
            "boxes": json.dumps([{"phrase": None, "grid": [10, 20, 30, 40]}]), "completion_tokens": 9,
            "finish_reason": "stop", "latency_ms": 100.0 + i, "status": 200, "error": None, **kw}


def _writer(store, **cfg) -> tuple[InferenceLog, dict]:
    counters = metrics(CollectorRegistry())
    return InferenceLog(str(store), InferenceLogConfig(**cfg), "w1", counters), counters


def _value(counter) -> float:
    return counter._value.get()


@pytest.mark.parametrize("mode, kept", [("full", QUESTION), ("hash", hashlib.sha256(QUESTION.encode()).hexdigest()),
                                        ("off", None)])
def test_rows_are_written_by_day_with_the_prompt_as_configured(tmp_path, mode, kept):
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    log, counters = _writer(tmp_path / "log", prompt=mode, flush_rows=2, flush_s=30)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    for i in range(3):
        log.record(_row(i), image)
    log.record(_row(3, yesterday), image)
    assert log.close()
    files = sorted(p.relative_to(tmp_path / "log").as_posix() for p in (tmp_path / "log").rglob("*.parquet"))
    today = f"date={datetime.now(UTC):%Y-%m-%d}"
    # 2 rows per file (flush_rows), a file per day, named by the writer and its sequence
    assert files == sorted([f"{today}/w1-000000.parquet", f"{today}/w1-000001.parquet",
                            f"date={yesterday:%Y-%m-%d}/w1-000002.parquet"]), files
    rows = read_log(tmp_path / "log")
    assert list(rows["request_id"]) == ["chatcmpl-3", "chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
    assert [None if p != p else p for p in rows["prompt"]] == [kept] * 4  # off: null (NaN in pandas)
    assert set(rows["prompt_chars"]) == {len(QUESTION)}
    assert set(rows["image_phash"]) == {perceptual_hash(image)} and len(perceptual_hash(image)) == 16
    assert set(rows["image_width"]) == {64} and set(rows["image_height"]) == {48}
    assert list(rows["image_signature"].iloc[1]) == [0.0] * 16 and rows["image_path"].isna().all()
    assert _value(counters["log_rows"]) == 4 and _value(counters["log_waiting"]) == 0
    assert not list((tmp_path / "log").rglob(".*"))  # no temp file left behind


def test_log_images_keeps_the_image_once_by_content_hash(tmp_path):
    log, _ = _writer(tmp_path / "log", log_images=True)
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    log.record(_row(0), image)
    log.record(_row(1), image)
    assert log.close()
    paths = read_log(tmp_path / "log")["image_path"].tolist()
    kept = list((tmp_path / "log" / "_images").iterdir())
    assert len(kept) == 1 and paths == [str(kept[0])] * 2 and kept[0].suffix == ".png"
    assert Image.open(kept[0]).convert("RGB").tobytes() == image.tobytes()
    assert kept[0].stem == hashlib.sha256(kept[0].read_bytes()).hexdigest()


def test_a_batch_is_written_after_flush_s_without_a_stop(tmp_path):
    log, counters = _writer(tmp_path / "log", flush_s=0.3)
    log.record(_row(0))
    deadline = time.time() + 10
    while _value(counters["log_rows"]) < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert len(read_log(tmp_path / "log")) == 1 and log.thread.is_alive()
    log.close()


def test_a_store_that_refuses_writes_is_retried_counted_and_never_raises(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    log, counters = _writer(tmp_path / "a_file" / "log", flush_s=0.1, write_attempts=3, retry_backoff_s=0.01)
    started = time.perf_counter()
    for i in range(5):
        log.record(_row(i))
    assert time.perf_counter() - started < 0.1  # the request side only queues
    deadline = time.time() + 10
    while _value(counters["log_failures"]) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert _value(counters["log_failures"]) >= 3 and _value(counters["log_retries"]) >= 2
    assert _value(counters["log_rows"]) == 0
    assert not log.close()  # the stop could not write them: dropped, and counted as such
    assert _value(counters["log_dropped"]) == 5 and _value(counters["log_waiting"]) == 0


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    (tmp_path / "a_file").write_text("")
    log, counters = _writer(tmp_path / "a_file", queue_rows=3, flush_s=30)
    log.stopping.set()  # the writer takes nothing more: the queue stays as full as it gets
    log.thread.join()
    log.stopping.clear()
    for i in range(5):
        log.record(_row(i))
    assert log.queue.qsize() == 3 and _value(counters["log_dropped"]) == 2


def test_old_day_partitions_and_images_are_deleted_by_retention(tmp_path):
    store = tmp_path / "log"
    old = store / f"date={datetime.now(UTC) - timedelta(days=10):%Y-%m-%d}"
    recent = store / f"date={datetime.now(UTC) - timedelta(days=2):%Y-%m-%d}"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "x-000000.parquet").write_bytes(b"")
    (store / "_images").mkdir()
    stale = store / "_images" / "old.png"
    stale.write_bytes(b"png")
    ten_days_ago = time.time() - 10 * 86400
    import os
    os.utime(stale, (ten_days_ago, ten_days_ago))
    log, _ = _writer(store, retention_days=7)
    log.close()
    assert not old.exists() and recent.exists() and not stale.exists()


def test_the_serve_config_has_the_log_block_with_checked_fields():
    cfg = ServeConfig.model_validate({"inference_log": {"prompt": "hash", "flush_rows": 10}})
    assert cfg.inference_log.prompt == "hash" and cfg.inference_log.enabled
    with pytest.raises(ValueError, match="prompt"):
        ServeConfig.model_validate({"inference_log": {"prompt": "partial"}})
    assert identifier_of("look [refer] the ship [caption]") == "refer" and identifier_of("hello") is None


def test_skyeye_log_tail_and_stats_read_the_store(tmp_path, monkeypatch):
    from skyeye.cli import app
    from skyeye.config import get_settings
    log, _ = _writer(tmp_path / "log")
    now = datetime.now(UTC)
    for i in range(10):
        log.record(_row(i, now - timedelta(minutes=10 - i)))
    log.record(_row(10, now, task="caption", version=2, status=400, error="bad image", answer=None,
                    latency_ms=1000.0, image_signature=None))  # a refusal: no signature (null)
    log.close()
    monkeypatch.setenv("SKYEYE_INFERENCE_LOG", str(tmp_path / "log"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        tail = runner.invoke(app, ["log", "tail", "-n", "2"], env={"COLUMNS": "250"})
        assert tail.exit_code == 0, tail.output
        assert "the last 2 of 11 requests" in tail.output and "bad image" in tail.output
        assert "chatcmpl" not in tail.output and tail.output.count("{<10><20><30><40>}") == 1
        assert tail.output.count(QUESTION) == 2  # the task identifier shown as written, not read as markup
        out = runner.invoke(app, ["log", "stats", "--json"])
        assert out.exit_code == 0, out.output
        stats = json.loads(out.output)
        assert stats["requests"] == 11
        assert stats["by_version_task_status"] == [
            {"version": 1, "task": "refer", "status": 200, "requests": 10},
            {"version": 2, "task": "caption", "status": 400, "requests": 1}]
        assert stats["latency_ms"]["1"] == {"p50": 104.5, "p90": 108.1, "p99": 108.9}
        assert stats["latency_ms"]["2"]["p50"] == 1000.0 and stats["latency_ms"]["all"]["p99"] > 900
        since = (now - timedelta(minutes=2, seconds=30)).isoformat()
        recent = json.loads(runner.invoke(app, ["log", "stats", "--since", since, "--json"]).output)
        assert recent["requests"] == 3  # minutes 2 and 1 before now, and the refused one
        text = runner.invoke(app, ["log", "stats"]).output
        assert "11 requests" in text and "p99" in text
        bad = runner.invoke(app, ["log", "stats", "--since", "yesterday"])
        assert bad.exit_code == 2 and "--since 'yesterday'" in bad.output
    finally:
        get_settings.cache_clear()


@pytest.mark.slow  # starts moto's S3 server
def test_the_log_goes_to_an_s3_compatible_store(tmp_path, monkeypatch):
    import os

    from tests.services import ObjectStore
    s3 = ObjectStore(tmp_path, dict(os.environ)).start()
    try:
        s3.create_buckets("skyeye-log")
        for key, value in s3.client_env().items():
            monkeypatch.setenv(key, value)
        log, counters = _writer("s3://skyeye-log/inference", log_images=True)
        image = Image.new("RGB", (32, 32), (10, 200, 10))
        for i in range(3):
            log.record(_row(i), image)
        assert log.close() and _value(counters["log_rows"]) == 3
        rows = read_log("s3://skyeye-log/inference")
        assert list(rows["request_id"]) == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
        from fsspec.core import url_to_fs
        fs, _ = url_to_fs("s3://skyeye-log")
        [kept] = set(rows["image_path"])
        assert kept.startswith("s3://skyeye-log/inference/_images/") and fs.exists(kept)
        assert fs.glob(f"skyeye-log/inference/date={datetime.now(UTC):%Y-%m-%d}/w1-*.parquet")
    finally:
        s3.stop()
