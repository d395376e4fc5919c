"""Putting a registered SkyEyeGPT version behind the API on Ray Serve, checking that it
answers, and recording the deployment on the version.

- `connect`: the Ray cluster RAY_ADDRESS names, else a private local Ray in this process
  (`cluster.ray_session`, which also says what the replicas are told).
- `deploy`: a registry reference (`models:/skyeyegpt@production`, a version) becomes the
  Serve application `skyeye`; deploying again under the same name rolls the replicas to
  the new version while the old ones keep answering (no request fails). With `canary.mode`
  canary or shadow (configs/serve.yaml), the candidate (`canary.candidate`, the staging
  alias by default) is served beside production behind the router (router.py).
- `verify`: the health check, then a real `[refer]` question about a test image whose
  answer must hold a box (or, where the server refuses unapproved tasks and the version is
  not approved for grounding, be refused as such).
- `record`: tags on the version (served since, endpoint, the version it replaced).
"""
from __future__ import annotations

# imports inside functions: Ray Serve, the server app and PIL load only when something is deployed or asked
import base64
import io
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from ..cluster import ray_session
from ..config import Settings, get_settings
from ..formats.files import atomic_write_text
from ..model.references import RegistryError, model_name, production_uri, resolve_version
from ..tracking import runs
from ..tracking.names import (
    MAX_PERIODS,
    TAG_SERVED_ENDPOINT,
    TAG_SERVED_PERIODS,
    TAG_SERVED_REPLACED,
    TAG_SERVED_SINCE,
    TAG_SERVED_UNTIL,
    serving_periods,
)
from .config import ServeConfig, load_serve_config


@dataclass
class Deployed:
    version: int
    uri: str  # models:/skyeyegpt/<version>
    url: str  # where the API answers
    replaced: int | None  # the version served before, if the app was running
    candidate: int | None = None  # the version deployed as the candidate (canary.mode not off)
    mode: str = "off"  # what the candidate does: off when there is none or it is production's own version


def candidate_version(cfg: ServeConfig) -> int | None:
    """The version `cfg.canary` serves beside production; None when the mode is off."""
    if cfg.canary.mode == "off":
        return None
    try:
        return resolve_version(cfg.canary.candidate)
    except RegistryError as err:
        raise RegistryError(f"canary.candidate: {err}") from None


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}"


def connect(cfg: ServeConfig) -> bool:
    """Ray for serving (`ray_session.connect`); True when a local Ray was started here (`shutdown`
    then stops it). On RAY_ADDRESS's cluster the app outlives this process."""
    # a rollout starts the new replicas before the old ones stop: room for both, and the proxy
    versions = 1 if cfg.canary.mode == "off" else 2  # a candidate beside production: room for its replicas too
    started = ray_session.connect(max(2, int(2 * versions * cfg.replicas * cfg.cpus_per_replica + 1)))
    return started and not ray_session.on_cluster()


def served_version(url: str, api_key: str | None = None, timeout_s: float = 5) -> int | None:
    """The version the API at `url` serves now, None when nothing answers there."""
    try:
        r = httpx.get(f"{url}/v1/models", headers=_auth(api_key), timeout=timeout_s)
        return r.json()["data"][0]["skyeye"]["version"] if r.status_code == 200 else None
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def deploy(model_ref: str | None = None, cfg: ServeConfig | None = None, settings: Settings | None = None
           ) -> Deployed:
    """Serve the version `model_ref` names (default: production) as the Serve app; Ray must
    be connected (`connect`), with the candidate of `cfg.canary` beside it. Returns once the new
    replicas answer."""
    from ray import serve
    s, cfg = settings or get_settings(), cfg or load_serve_config()
    version = resolve_version(model_ref or production_uri())
    uri = f"models:/{model_name()}/{version}"
    candidate = candidate_version(cfg)
    url = base_url(cfg)
    replaced = served_version(url, os.environ.get(cfg.api_key_env))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(uri, cfg, s, candidate), name=cfg.app_name, route_prefix="/")
    mode = cfg.canary.mode if candidate not in (None, version) else "off"
    return Deployed(version, uri, url, replaced, candidate, mode)


def application(uri: str, cfg: ServeConfig, settings: Settings | None = None, candidate: int | None = None):
    """The Serve application of one model version with these limits, and `candidate` beside it
    behind the router when given (production's own version: the router sends it nothing, and
    the app keeps its shape, so the next move of either alias rolls as any other). Deployed
    again under the same name (a new version or new limits), it rolls the replicas without
    dropping requests."""
    store = log_store(settings)
    if candidate is None:
        return _server(cfg, settings).bind(uri, log_store=store)
    server = _server(cfg, settings, behind_router=True)
    from .router import SkyEyeRouter
    production = resolve_version(uri)
    role = "shadow" if cfg.canary.mode == "shadow" else "candidate"
    handles = (server.options(name="production").bind(uri, log_store=store, role="production"),
               server.options(name="candidate").bind(f"models:/{model_name()}/{candidate}", log_store=store,
                                                     role=role))
    # every request passes the router and waits there for its answer: room for both versions' connections
    return SkyEyeRouter.options(
        user_config=cfg.model_dump(mode="json"), max_ongoing_requests=2 * cfg.replicas * cfg.max_connections,
        ray_actor_options={"num_cpus": 0, "runtime_env": {
            "env_vars": ray_session.worker_env(settings or get_settings(), cfg.api_key_env)}},
    ).bind(*handles, {"production": production, "candidate": candidate})


def _server(cfg: ServeConfig, settings: Settings | None, behind_router: bool = False):
    from ray.serve.config import BackpressureConfig

    from .app import SkyEyeServer, SkyEyeVersion
    s = settings or get_settings()
    return (SkyEyeVersion if behind_router else SkyEyeServer).options(
        num_replicas=cfg.replicas, user_config=cfg.model_dump(mode="json"),
        # chat requests reach the replica, which admits queue_limit and answers 429 beyond it; the
        # rest of max_connections is for health checks and the web demo's long-lived streams, which
        # would otherwise starve the demo's own questions. Ray's queue beyond it is a backstop.
        max_ongoing_requests=cfg.max_connections, max_queued_requests=cfg.max_connections,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s),
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "runtime_env": {
            "env_vars": ray_session.worker_env(s, cfg.api_key_env)}},
    )


def log_store(settings: Settings | None = None) -> str:
    """Where the replicas write the inference log: SKYEYE_INFERENCE_LOG (a folder, made absolute:
    a replica's working directory is not ours, or an fsspec URL), else <state>/inference_log."""
    store = (settings or get_settings()).inference_log_store
    return store if "://" in store else str(Path(store).resolve())


def _png_data_url(path: Path) -> str:
    from PIL import Image
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_question(settings: Settings | None = None) -> tuple[Path, str]:
    """A test image and a referring expression from the grounding benchmark's evaluation file."""
    s = settings or get_settings()
    path = s.instructions_dir / "eval" / "dior_rsvg_test.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no evaluation file to ask a test question about (run `skyeye data build`)")
    row = json.loads(path.read_text())["samples"][0]
    return (path.parent / row["image"]).resolve(), row["expression"]


def verify(url: str, image: Path, expression: str, version: int, api_key: str | None = None,
           timeout_s: float = 180) -> dict:
    """Wait for the health check, then ask `[refer] expression` about `image`: the answer must
    come from `version` and hold a box, or be the 422 of a server that refuses questions of
    unapproved tasks (its error body is returned). Returns the response; RuntimeError says
    what failed."""
    deadline, last = time.time() + timeout_s, "no answer"
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200 and r.json().get("version") == version:
                break
            last = f"/health answered {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as err:
            last = f"/health: {err}"
        time.sleep(1)
    else:
        raise RuntimeError(f"{url} did not report version {version} healthy within {timeout_s:.0f} s ({last})")
    body = {"model": model_name(), "max_tokens": 24, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
        {"type": "text", "text": f"[refer] {expression}"}]}]}
    for _ in range(30):  # a busy server answers 429: wait as it asks
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(api_key), timeout=120)
        if r.status_code != 429:
            break
        time.sleep(float(r.headers.get("retry-after", 1)))
    if r.status_code == 422 and r.json()["error"]["code"] == "unapproved_task":
        return r.json()  # unapproved_tasks: refuse, and the version is not approved for grounding
    if r.status_code != 200:
        raise RuntimeError(f"{url}: a test question got {r.status_code}: {r.text[:300]}")
    out = r.json()
    if not out["skyeye"]["boxes"]:
        raise RuntimeError(f"version {version} answered {out['choices'][0]['message']['content']!r} to "
                           f"'[refer] {expression}': no box")
    return out


def record(deployed: Deployed) -> None:
    """The deployment on the version (and its end on the version it replaced)."""
    client, name = runs.client(), model_name()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    tags = client.get_model_version(name, str(deployed.version)).tags  # before this period's tags
    for key, value in {TAG_SERVED_SINCE: now, TAG_SERVED_ENDPOINT: deployed.url,
                       TAG_SERVED_REPLACED: str(deployed.replaced or "none")}.items():
        client.set_model_version_tag(name, str(deployed.version), key, value)
    periods = serving_periods(tags) + [{"endpoint": deployed.url, "since": now, "until": None}]
    _set_periods(client, name, deployed.version, periods)
    if TAG_SERVED_UNTIL in tags:  # served again
        client.delete_model_version_tag(name, str(deployed.version), TAG_SERVED_UNTIL)
    if deployed.replaced and deployed.replaced != deployed.version:
        record_stop(deployed.replaced, deployed.url)


def _set_periods(client, name: str, version: int, periods: list[dict]) -> None:
    client.set_model_version_tag(name, str(version), TAG_SERVED_PERIODS, json.dumps(periods[-MAX_PERIODS:]))


def record_stop(version: int, endpoint: str | None = None) -> str:
    """The end of a version's deployment at `endpoint` (replaced, or its server stopped; None:
    its newest open period); returns its time."""
    client, name = runs.client(), model_name()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    periods = serving_periods(client.get_model_version(name, str(version)).tags)
    open_ = [p for p in periods if p.get("until") is None and endpoint in (None, p.get("endpoint"))]
    if open_:
        open_[-1]["until"] = now
        _set_periods(client, name, version, periods)
    client.set_model_version_tag(name, str(version), TAG_SERVED_UNTIL, now)
    return now


# ------------------------------------------------------------------ a local server's state
def _state_file(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).state / "serving.json"


def write_state(url: str, version: int, follows: str | None, settings: Settings | None = None) -> None:
    """What a local `skyeye serve` serves, for the commands and flows that look for it."""
    path = _state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"pid": os.getpid(), "url": url, "version": version, "follows": follows}))


def read_state(settings: Settings | None = None) -> dict | None:
    """The local server's state, None when there is none (or its process is gone)."""
    path = _state_file(settings)
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
        return state
    except (OSError, ValueError, KeyError):
        return None


def remove_state(settings: Settings | None = None) -> None:
    _state_file(settings).unlink(missing_ok=True)


def wait_for_version(url: str, version: int, timeout_s: float = 180, api_key: str | None = None) -> bool:
    """Whether the API at `url` serves `version` within the time (a follower rolling out)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if served_version(url, api_key) == version:
            return True
        time.sleep(2)
    return False


def shutdown(started_ray: bool) -> None:
    """Stop the Serve apps, and the local Ray if this process started it."""
    import ray
    from ray import serve
    serve.shutdown()
    if started_ray:
        ray.shutdown()
