"""Canary and shadow: two registered versions served at once behind one API.

`SkyEyeRouter` is the ingress; it holds DeploymentHandles to two `SkyEyeVersion` deployments
(app.py's replica without its HTTP app): `production` and `candidate` (role `candidate` in
canary mode, `shadow` in shadow mode; configs/serve.yaml `canary:`).

- canary: a chat request that names no version (`skyeyegpt`) goes to the candidate with
  probability canary_percent/100, an independent draw per request; else to production.
- shadow: production answers the client; a copy of the request goes to the candidate at the
  same time and is never awaited on the client's path: its answer and its errors are counted
  (/metrics, the inference log), never sent.
- A request naming a version (`skyeyegpt/N`) goes to that version, in either mode.

Every answer says who gave it: the headers X-SkyEye-Version and X-SkyEye-Role, and
`skyeye.lineage.version` in the body. The router gives each request an id (X-SkyEye-Request-Id)
that both answers of a shadowed request carry, so the log pairs them. `/metrics` holds the
router's counts per version and role and each deployment's own metrics (labelled with
version and role) in one exposition.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from .app import (
    REQUEST_ID_HEADER,
    ROLE_HEADER,
    VERSION_HEADER,
    _add_error_handlers,
    _error,
    _openapi_schema,
    add_routes,
    authorize,
)
from .config import CanaryConfig, ServeConfig
from .protocol import APIError

logger = logging.getLogger("ray.serve")
NAMED_VERSION = re.compile(r"[^/]+/v?(\d+)")  # a model id naming a version, skyeyegpt/N: that version, no draw


def _metrics() -> dict[str, Any]:
    registry = CollectorRegistry()
    return {"registry": registry,
            "routed": Counter("skyeye_routed_requests", "Chat requests the router passed on, by the version and "
                              "role that answered and the status (role shadow: the copies)",
                              ["version", "role", "status"], registry=registry),
            "latency": Histogram("skyeye_routed_latency_seconds", "Chat latency through the router, per version "
                                 "and role", ["version", "role"], registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))}


def merge_exposition(texts: list[str]) -> str:
    """Prometheus texts as one: the samples of a metric family from several texts (the same
    metric of both deployments, told apart by their version and role labels) under one family."""
    families: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name in families:
                families[family.name].samples.extend(family.samples)
            else:
                families[family.name] = family

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry).decode()


def route(body: bytes, versions: dict[str, int], canary: CanaryConfig, rng: random.Random) -> tuple[str, bool]:
    """(the deployment that answers a chat request's `body`, whether a copy goes to the shadow);
    `versions`: what each deployment serves. A candidate that is production's own version (a
    promoted one) gets nothing."""
    candidate = versions["candidate"]
    if candidate == versions["production"]:
        return "production", False
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        model = None  # a malformed body: production's replica answers it with its 400
    named = NAMED_VERSION.fullmatch(model) if isinstance(model, str) else None
    if named:  # production's version, or one not served here (production's replica refuses it)
        return ("candidate" if int(named[1]) == candidate else "production"), False
    if canary.mode == "canary" and rng.random() * 100 < canary.canary_percent:
        return "candidate", False
    return "production", canary.mode == "shadow"


@serve.deployment(name="SkyEyeRouter", max_surge_percent=100)
@serve.ingress()
class SkyEyeRouter:
    """The ingress of a canary or shadow app: routes chat requests between two versions."""

    def __init__(self, production, candidate, versions: dict[str, int], seed: int | None = None):
        self.handles = {"production": production, "candidate": candidate}
        self.versions = versions  # deployment -> the version it was deployed with
        self.rng = random.Random(seed)
        self.config, self.metrics = ServeConfig(), _metrics()
        self.shadows: set[asyncio.Task] = set()  # copies in flight: a reference keeps each task alive

    def reconfigure(self, config: dict) -> None:
        self.config = ServeConfig.model_validate(config)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="SkyEyeGPT", version="1", description="SkyEyeGPT, remote-sensing multimodal LLM, "
                      "behind the OpenAI chat-completions API; a candidate version beside production.")
        _add_error_handlers(app)
        add_routes(app, self)
        app.openapi = lambda: _openapi_schema(app)
        from . import web  # gradio is heavy: only replicas load it
        web.mount(app)
        return app

    @property
    def candidate_role(self) -> str:
        return "shadow" if self.config.canary.mode == "shadow" else "candidate"

    def health(self) -> dict:
        return {"status": "ok", "version": self.versions["production"],
                "candidate": {"version": self.versions["candidate"], "role": self.candidate_role}}

    def authorize(self, request: Request) -> None:
        authorize(request, self.config)

    async def models(self) -> dict[str, Any]:
        """Production's models, then the candidate's own version; each says its role."""
        prod, cand = await asyncio.gather(*(h.models.remote() for h in self.handles.values()))
        data = [{**m, "skyeye": {**m["skyeye"], "role": "production"}} for m in prod["data"]]
        seen = {m["id"] for m in data}
        data += [{**m, "skyeye": {**m["skyeye"], "role": self.candidate_role}}
                 for m in cand["data"] if m["id"] not in seen]
        return {"object": "list", "data": data}

    async def metrics_text(self) -> str:
        texts = [generate_latest(self.metrics["registry"]).decode()]
        for name, handle in self.handles.items():
            try:
                texts.append((await handle.metrics_text.remote()).decode())
            except Exception as err:  # noqa: BLE001 - a replica gone: the others' figures still count
                logger.warning("metrics of %s unavailable: %s", name, err)
        return merge_exposition(texts)

    async def chat(self, request: Request) -> Response:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        body = await request.body()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != REQUEST_ID_HEADER.lower().encode()]
        headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
        target, copy = route(body, self.versions, self.config.canary, self.rng)
        if copy:
            task = asyncio.create_task(self._ask("candidate", headers, body))
            self.shadows.add(task)
            task.add_done_callback(self.shadows.discard)
        status, out, content = await self._ask(target, headers, body)
        out[REQUEST_ID_HEADER.lower()] = request_id
        return Response(content, status_code=status, headers=out)

    async def _ask(self, deployment: str, headers: list, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One deployment's answer as (status, headers, body); Ray's own failures as OpenAI errors."""
        from ray.serve.exceptions import BackPressureError
        role = "production" if deployment == "production" else self.candidate_role
        started = time.perf_counter()
        try:
            status, out, content = await self.handles[deployment].handle_chat.remote(headers, body)
        except BackPressureError:
            err = APIError(429, f"the {role} version is at its limit; retry after {self.config.retry_after_s} s",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)})
            status, out, content = err.status, {**err.headers, "content-type": "application/json"}, _error(err).body
        except Exception as err:  # noqa: BLE001 - a replica lost mid-request: the client gets a 500, not a hang
            logger.warning("%s (%s) failed: %r", deployment, role, err)
            error = APIError(500, f"internal error: {type(err).__name__}", type="server_error")
            status, out, content = 500, {"content-type": "application/json"}, _error(error).body
        out = {k.lower(): v for k, v in out.items()}
        version = out.get(VERSION_HEADER.lower()) or str(self.versions[deployment])
        out[VERSION_HEADER.lower()], out[ROLE_HEADER.lower()] = version, role
        self.metrics["routed"].labels(version=version, role=role, status=str(status)).inc()
        self.metrics["latency"].labels(version=version, role=role).observe(time.perf_counter() - started)
        return status, out, content
