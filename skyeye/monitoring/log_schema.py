"""The inference log: one row per answered (or refused) request of `skyeye serve`.

Parquet files partitioned by day, `<store>/date=YYYY-MM-DD/<writer>-<n>.parquet`, under a
local folder or an S3-compatible URL (`s3://bucket/prefix`, through fsspec/s3fs). Any data
tool reads it: `pandas.read_parquet(store)`, DuckDB, Spark. The serving side writes it in
batches (skyeye/serving/inference_log.py); the monitor and `skyeye log` read it here.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa

from .signals import SIGNATURE_DIMS

PARTITION = "date"
SCHEMA = pa.schema([
    ("time", pa.timestamp("ms", tz="UTC")),          # when the answer (or the refusal) was sent
    ("request_id", pa.string()),
    ("model", pa.string()),                          # registered model name
    ("version", pa.int64()),                         # the registered version that answered
    ("role", pa.string()),                           # production | candidate (canary) | shadow
    ("task", pa.string()),                           # task identifier of the question (refer, caption, vqa, ...)
    ("prompt", pa.string()),                         # full text, its sha256, or null (configs/serve.yaml)
    ("prompt_chars", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("image_phash", pa.string()),                    # monitoring.signals.perceptual_hash of the first image
    ("image_width", pa.int64()),
    ("image_height", pa.int64()),
    ("image_signature", pa.list_(pa.float32(), SIGNATURE_DIMS)),  # monitoring.signals.signature_of_tokens
    ("image_path", pa.string()),                     # where the image was stored, only with log_images: true
    ("answer", pa.string()),
    ("boxes", pa.string()),                          # JSON list of the parsed boxes ({phrase, grid, pixels})
    ("completion_tokens", pa.int64()),
    ("finish_reason", pa.string()),                  # stop | length
    ("latency_ms", pa.float64()),
    ("status", pa.int64()),                          # HTTP status sent
    ("error", pa.string()),                          # the error's message for a status >= 400
])


def partition_of(time: datetime) -> str:
    return f"{PARTITION}={time.astimezone(timezone.utc):%Y-%m-%d}"


def read_log(store: str, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
    """The log's rows with `since <= time < until`, oldest first; an empty frame when there are none."""
    import pyarrow.dataset as ds
    from fsspec.core import url_to_fs
    fs, root = url_to_fs(str(store))
    if not fs.exists(root):
        return SCHEMA.empty_table().to_pandas()
    data = ds.dataset(root, filesystem=fs, format="parquet", schema=SCHEMA, partitioning="hive",
                      exclude_invalid_files=True)
    cond = None
    for op, t in ((ds.field("time") >= _ts(since), since), (ds.field("time") < _ts(until), until)):
        if t is not None:
            cond = op if cond is None else cond & op
    table = data.to_table(filter=cond)
    return table.to_pandas().sort_values("time", kind="stable").reset_index(drop=True)


def _ts(t: datetime | None):
    return None if t is None else pa.scalar(t.astimezone(timezone.utc), pa.timestamp("ms", tz="UTC"))
