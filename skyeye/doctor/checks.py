"""`skyeye doctor`: which backend each part of the platform uses, whether it answers, and what
to set when it does not.

Each part has an embedded default and a documented variable that points it at a server:
tracking and registry (`MLFLOW_TRACKING_URI`), orchestration (`PREFECT_API_URL`), compute
(`RAY_ADDRESS`), data versions (`SKYEYE_DVC_REMOTE_URL`), checkpoints (`SKYEYE_RAY_STORAGE`),
and the S3 endpoint and keys every S3 client reads (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`). Checks are cheap (an HTTP health call, a TCP connect, a bucket
lookup) so the command answers in seconds even when something is down.
"""
from __future__ import annotations

# imports inside functions: sqlalchemy and boto3 load only for the backend that is configured
import os
import socket
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from ..config import Settings, get_settings

TIMEOUT_S = 5.0


@dataclass
class Check:
    part: str
    backend: str  # what it is and where, e.g. "MLflow server http://..."
    ok: bool
    detail: str  # what answered, or what failed
    hint: str = ""  # what to set or start when it failed

    def as_dict(self) -> dict:
        return asdict(self)


def _http_ok(url: str) -> tuple[bool, str]:
    try:
        response = httpx.get(url, timeout=TIMEOUT_S)
    except httpx.HTTPError as err:
        return False, f"no answer from {url}: {type(err).__name__}"
    return response.status_code == 200, f"{url} answered {response.status_code}"


def _tcp_ok(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return True, f"{host}:{port} accepts connections"
    except OSError as err:
        return False, f"{host}:{port} refused: {err.strerror or err}"


def check_tracking(s: Settings) -> Check:
    uri = s.tracking_uri
    if uri.startswith(("http://", "https://")):
        ok, detail = _http_ok(uri.rstrip("/") + "/health")
        return Check("tracking + registry", f"MLflow server {uri}", ok, detail,
                     "" if ok else f"start the MLflow server at {uri}, or unset MLFLOW_TRACKING_URI for the "
                                   "embedded SQLite store")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            return Check("tracking + registry", f"SQLite {path}", False, f"{path.parent} does not exist",
                         "create the folder, or set MLFLOW_TRACKING_URI")
        try:  # opening creates nothing when the file exists; a missing file is made on first use
            if path.exists():
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT_S).execute(
                    "select count(*) from sqlite_master").fetchone()
        except sqlite3.Error as err:
            return Check("tracking + registry", f"SQLite {path}", False, f"cannot read: {err}",
                         "check the file, or set MLFLOW_TRACKING_URI")
        state = "exists" if path.exists() else "will be created on first use"
        return Check("tracking + registry", f"SQLite {path} (embedded default)", True, state)
    if uri.startswith("postgresql") or uri.startswith("mysql"):  # a database straight, without a server
        try:
            import sqlalchemy
            with sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(TIMEOUT_S)}).connect() as conn:
                conn.execute(sqlalchemy.text("select 1"))
            return Check("tracking + registry", f"database {_redact(uri)}", True, "answered select 1")
        except Exception as err:
            return Check("tracking + registry", f"database {_redact(uri)}", False, f"{type(err).__name__}: {err}",
                         "start the database or fix MLFLOW_TRACKING_URI")
    return Check("tracking + registry", uri, True, "not checked (unknown scheme)")


def check_orchestration() -> Check:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return Check("orchestration", "Prefect, a temporary local server per run (embedded default)", True,
                     "started by each flow run; `skyeye server up` keeps one up for schedules")
    ok, detail = _http_ok(api.rstrip("/") + "/health")
    return Check("orchestration", f"Prefect server {api}", ok, detail,
                 "" if ok else "start it (`prefect server start`, or `skyeye server up`) or unset PREFECT_API_URL")


def check_compute() -> Check:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return Check("compute", "Ray, a private local instance per job (embedded default)", True,
                     "started by each job; never attaches to another cluster")
    if address.startswith("ray://"):
        parsed = urlparse(address)
        host, port = parsed.hostname or "", parsed.port or 10001
    elif address == "auto":
        return Check("compute", "Ray cluster (RAY_ADDRESS=auto)", False, "'auto' attaches to whatever runs here",
                     "name the head: RAY_ADDRESS=<head-host>:6379")
    else:
        host, _, port_text = address.rpartition(":")
        host, port = host or address, int(port_text) if port_text.isdigit() else 6379
    ok, detail = _tcp_ok(host, port)
    hint = ""
    if not ok:
        hint = f"start the head (`ray start --head --port {port}`) or unset RAY_ADDRESS"
    elif not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")) \
            and not (Path.home() / ".ray" / "auth_token").exists():
        hint = "no Ray auth token here: set RAY_AUTH_TOKEN to the cluster's token if it uses token auth"
    return Check("compute", f"Ray cluster {address}", ok, detail, hint)


def check_checkpoints(s: Settings) -> Check:
    target = s.checkpoint_storage
    shared = "://" in target
    if shared:
        return _check_s3_url("checkpoints", target, "SKYEYE_RAY_STORAGE")
    ok = _writable(Path(target))
    detail = "writable" if ok else "not writable"
    hint = "" if ok else f"fix the permissions of {target} or set SKYEYE_RAY_STORAGE"
    if ok and os.environ.get("RAY_ADDRESS"):
        ok, detail = False, "a folder on this machine only"
        hint = ("a cluster's workers cannot reach it: set SKYEYE_RAY_STORAGE to storage every node reaches "
                "(s3://bucket/path, or an NFS mount)")
    return Check("checkpoints", f"folder {target}" + ("" if s.ray_storage else " (embedded default)"), ok, detail,
                 hint)


def check_data_remote(s: Settings) -> Check:
    url = s.dvc_remote_url
    if not url:
        local = s.project_root / ".dvc-storage"
        return Check("data versions", f"DVC remote {local} (embedded default)", _writable(local),
                     "the committed local remote", "" if _writable(local) else f"cannot write {local}")
    if "://" in url:
        return _check_s3_url("data versions", url, "SKYEYE_DVC_REMOTE_URL")
    path = Path(url) if os.path.isabs(url) else s.project_root / url
    ok = _writable(path)
    return Check("data versions", f"DVC remote folder {path}", ok, "writable" if ok else "not writable",
                 "" if ok else "create it or fix SKYEYE_DVC_REMOTE_URL")


def _check_s3_url(part: str, url: str, variable: str) -> Check:
    parsed = urlparse(url)
    if parsed.scheme not in ("s3", "s3a"):
        return Check(part, url, True, f"not checked ({parsed.scheme}:// storage)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"S3 bucket {parsed.netloc} at {endpoint or 'AWS'}"
    try:
        import boto3
        from botocore.config import Config
        client = boto3.client("s3", endpoint_url=endpoint, config=Config(
            connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}))
        client.head_bucket(Bucket=parsed.netloc)
    except ImportError:
        return Check(part, where, False, "boto3 is not installed", "pip install boto3")
    except Exception as err:
        return Check(part, where, False, f"{type(err).__name__}: {err}",
                     f"check {variable}, AWS_ENDPOINT_URL and the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    return Check(part, where, True, "bucket reachable")


def _writable(path: Path) -> bool:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder.is_dir() and os.access(folder, os.W_OK)
    return False


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def run_checks(settings: Settings | None = None) -> list[Check]:
    s = settings or get_settings()
    return [check_tracking(s), check_orchestration(), check_compute(), check_checkpoints(s), check_data_remote(s)]
