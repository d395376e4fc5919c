"""The inference log's writer: every answered or refused request of a replica becomes a row
of `skyeye.monitoring.log_schema.SCHEMA`, written in batches off the request path.

- `record` only puts the row on a bounded in-memory queue: a request never waits on the
  log and never fails because of it; when the queue is full the row is dropped and counted.
- A thread drains the queue, computes what costs time (the image's perceptual hash, the
  image file under `log_images`), and writes a Parquet file per batch (every `flush_rows`
  rows or `flush_s` seconds) to `<store>/date=YYYY-MM-DD/<writer>-<seq>.parquet` through
  fsspec (a folder, or s3://...): on a local folder to a hidden temp name then renamed, so
  readers never see half a file (an S3 object appears whole anyway).
- A write that fails is retried with a doubling backoff; a batch that still fails waits
  for the next flush (at most `queue_rows` rows are held; the oldest beyond are dropped).
- `close` writes what is left (Ray Serve's replica shutdown calls it): a clean stop loses nothing.
- Day partitions and kept images older than `retention_days` are deleted, at most once an hour.
Counters (`metrics`) go to the replica's /metrics.
"""
from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..formats.prompts import TASK_IDENTIFIERS
from ..monitoring.log_schema import PARTITION, SCHEMA, partition_of
from ..monitoring.signals import perceptual_hash
from .config import InferenceLogConfig

logger = logging.getLogger("ray.serve")
RETENTION_EVERY_S = 3600.0
IMAGES = "_images"  # beside the day partitions; "_": Parquet readers (pyarrow, pandas, Spark) skip it
_POLL_S = 0.25     # how soon the writer notices a stop while idle

# SCHEMA as the files hold it: the signature as a plain list. Arrow's Parquet reader (pyarrow 25
# here, apache/arrow#35692) cannot read a null fixed-size list, and a refused request has no
# signature; `read_log` casts the column back to SCHEMA's 16 floats.
STORED = SCHEMA.set(SCHEMA.get_field_index("image_signature"), pa.field("image_signature", pa.list_(pa.float32())))


def metrics(registry: CollectorRegistry, version: str = "", role: str = "production") -> dict[str, Any]:
    """The log's counters, in the replica's registry (one set per replica, whatever the writer),
    labelled like its other metrics: beside a candidate both versions' appear in one /metrics."""
    labels = ["version", "role"]
    out = {"log_rows": Counter("skyeye_inference_log_rows_written", "Inference log rows written", labels,
                               registry=registry),
           "log_failures": Counter("skyeye_inference_log_write_failures",
                                   "Inference log writes that raised (each try)", labels, registry=registry),
           "log_retries": Counter("skyeye_inference_log_write_retries", "Inference log writes tried again", labels,
                                  registry=registry),
           "log_dropped": Counter("skyeye_inference_log_rows_dropped",
                                  "Inference log rows dropped (queue full, or not written by the stop)", labels,
                                  registry=registry),
           "log_waiting": Gauge("skyeye_inference_log_rows_waiting", "Inference log rows not yet written", labels,
                                registry=registry)}
    return {k: m.labels(version=version, role=role) for k, m in out.items()}


def identifier_of(question: str) -> str | None:
    """The question's task identifier without brackets (`refer`, `caption`, ...): the first one
    in it, as the model reads it; None for free text."""
    found = sorted((question.find(i), i) for i in TASK_IDENTIFIERS if i in question)
    return found[0][1].strip("[]") if found else None


def prompt_field(text: str, mode: str) -> str | None:
    """The question as the log keeps it: `full` text, `hash` (sha256 hex), or `off` (None)."""
    if mode == "full":
        return text
    return hashlib.sha256(text.encode()).hexdigest() if mode == "hash" else None


class InferenceLog:
    """A replica's writer to the store `store` (a folder or an fsspec URL)."""

    def __init__(self, store: str, cfg: InferenceLogConfig, writer: str, counters: dict[str, Any]):
        from fsspec.core import url_to_fs
        self.store, self.cfg, self.writer, self.counters = str(store), cfg, writer, counters
        self.fs, self.root = url_to_fs(self.store)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_rows)
        self.seq, self.pending = 0, []  # rows taken off the queue, not yet written
        self.lost_at_stop = 0
        self.retained_at: float | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"inference-log-{writer}", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the request side
    def record(self, row: dict[str, Any], image=None) -> None:
        """Queue one row (SCHEMA's columns; `time` a datetime, `prompt` the full question, which
        the writer keeps as configured); `image` is the request's first PIL image. Never blocks."""
        if self.stopping.is_set():
            self.counters["log_dropped"].inc()
            return
        try:
            self.queue.put_nowait((row, image))
            self.counters["log_waiting"].inc()
        except queue.Full:
            self.counters["log_dropped"].inc()

    def close(self, timeout_s: float = 8.0) -> bool:
        """Write every waiting row, then stop; True when nothing was left unwritten."""
        self.stopping.set()
        self.thread.join(timeout_s)
        return not self.thread.is_alive() and not self.lost_at_stop

    # ---------------------------------------------------------------- the writer thread
    def _run(self) -> None:
        first_at: float | None = None  # when the oldest unwritten row came
        next_try = 0.0                 # after a failed flush, the store is left alone for flush_s
        while True:
            stop = self.stopping.is_set()
            try:  # stopping: take what is left without waiting
                if stop:
                    item = self.queue.get_nowait()
                else:
                    left = _POLL_S if first_at is None else first_at + self.cfg.flush_s - time.monotonic()
                    item = self.queue.get(timeout=min(_POLL_S, max(0.0, left)))
                self.pending.append(self._complete(*item))
                first_at = first_at or time.monotonic()
                drained = False
            except queue.Empty:
                drained = True
            now = time.monotonic()
            due = len(self.pending) >= self.cfg.flush_rows or (first_at is not None
                                                                and now - first_at >= self.cfg.flush_s)
            final = stop and drained
            if self.pending and (final or (due and now >= next_try)):
                self._flush(final)
                first_at = time.monotonic() if self.pending else None
                next_try = time.monotonic() + (self.cfg.flush_s if self.pending else 0.0)
            self._retain()
            if final:
                return

    def _complete(self, row: dict[str, Any], image) -> dict[str, Any]:
        """What the request left for later: the prompt as configured, the image's hash (and file)."""
        row = dict(row)
        row["prompt"] = prompt_field(row["prompt"], self.cfg.prompt) if row.get("prompt") is not None else None
        if image is not None:
            row["image_width"], row["image_height"] = image.size
            try:
                row["image_phash"] = perceptual_hash(image)
                if self.cfg.log_images:
                    row["image_path"] = self._keep_image(image)
            except Exception as err:  # noqa: BLE001 - a bad image or store must not stop the log
                self.counters["log_failures"].inc()
                logger.warning("inference log: the image of request %s not kept: %s", row.get("request_id"), err)
        return row

    def _keep_image(self, image) -> str:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
        path = f"{self.root}/{IMAGES}/{hashlib.sha256(data).hexdigest()}.png"
        if not self.fs.exists(path):
            self._put(path, data)
        return self.fs.unstrip_protocol(path) if not self.local else path

    def _put(self, path: str, data: bytes) -> None:
        """`data` at `path`, whole or not at all: a hidden temp name then a rename on a local folder."""
        parent, name = path.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{parent}/.{name}.tmp"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def _flush(self, final: bool) -> None:
        """Write the waiting rows, a file per day; rows that could not be written stay waiting."""
        rows, self.pending = self.pending, []
        by_day: dict[str, list[dict]] = {}
        for row in rows:
            by_day.setdefault(partition_of(row["time"]), []).append(row)
        for day, part in by_day.items():
            for i in range(0, len(part), self.cfg.flush_rows):
                chunk = part[i:i + self.cfg.flush_rows]
                if not self._write(day, chunk):
                    self.pending.extend(chunk)
        if final and self.pending:
            logger.error("inference log: %d rows not written to %s at the stop", len(self.pending), self.store)
            self.lost_at_stop = len(self.pending)
            self.counters["log_dropped"].inc(len(self.pending))
            self.counters["log_waiting"].dec(len(self.pending))
            self.pending = []
        overflow = len(self.pending) - self.cfg.queue_rows
        if overflow > 0:  # the store refuses writes for long: keep the newest
            self.counters["log_dropped"].inc(overflow)
            self.counters["log_waiting"].dec(overflow)
            self.pending = self.pending[overflow:]

    def _write(self, day: str, rows: list[dict]) -> bool:
        buf = io.BytesIO()
        try:  # SCHEMA checks the types and the signature's size; a row it refuses is a bug, not the store's
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA).cast(STORED), buf)
        except (pa.ArrowException, TypeError, ValueError) as err:
            logger.error("inference log: %d rows dropped, not in the log's schema: %s", len(rows), err)
            self.counters["log_dropped"].inc(len(rows))
            self.counters["log_waiting"].dec(len(rows))
            return True  # nothing to try again
        path = f"{self.root}/{day}/{self.writer}-{self.seq:06d}.parquet"
        backoff = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.write_attempts):
            if attempt:
                self.counters["log_retries"].inc()
                time.sleep(backoff)
                backoff *= 2
            try:
                self._put(path, buf.getvalue())
            except Exception as err:  # noqa: BLE001 - any store error: retried, counted, never raised
                self.counters["log_failures"].inc()
                last = attempt + 1 == self.cfg.write_attempts  # one warning per batch, not per try
                logger.log(logging.WARNING if last else logging.INFO, "inference log: writing %d rows to %s "
                           "failed (try %d of %d): %s", len(rows), path, attempt + 1, self.cfg.write_attempts, err)
                continue
            self.seq += 1
            self.counters["log_rows"].inc(len(rows))
            self.counters["log_waiting"].dec(len(rows))
            return True
        return False

    def _retain(self) -> None:
        """Delete day partitions and kept images older than `retention_days` (at most once an hour)."""
        days, now = self.cfg.retention_days, time.monotonic()
        if days is None or (self.retained_at is not None and now - self.retained_at < RETENTION_EVERY_S):
            return
        self.retained_at = now
        cutoff = datetime.now(UTC) - timedelta(days=days)
        try:
            if not self.fs.exists(self.root):
                return
            for entry in self.fs.ls(self.root, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(f"{PARTITION}=") and name[len(PARTITION) + 1:] < f"{cutoff:%Y-%m-%d}":
                    self.fs.rm(entry, recursive=True)
            images = f"{self.root}/{IMAGES}"
            for path in self.fs.ls(images, detail=False) if self.fs.exists(images) else []:
                modified = self.fs.modified(path)
                if (modified if modified.tzinfo else modified.replace(tzinfo=UTC)) < cutoff:
                    self.fs.rm(path)
        except Exception as err:  # noqa: BLE001 - retention is housekeeping: never stops the log
            logger.warning("inference log: retention in %s failed: %s", self.store, err)


