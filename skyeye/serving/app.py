"""The served SkyEyeGPT: a Ray Serve deployment with a FastAPI ingress that speaks the
OpenAI chat-completions contract.

- `POST /v1/chat/completions` (plain or `stream: true`), `GET /v1/models`, `GET /health`,
  `GET /metrics` (Prometheus text).
- Concurrent requests are collected by Ray Serve's batching (`max_batch_size`,
  `batch_wait_s`) into one batched, KV-cached generation of the engine.
- Limits (configs/serve.yaml): the API key, the body size (413), admission beyond
  `queue_limit` requests per replica (429 with Retry-After), a request timeout (504), and
  the request checks of `protocol` and `media` (400). Errors have OpenAI's error body.
- Approval: a question of a task the served version is not approved for (the registry tag
  `skyeye.approved_tasks`, read at load) is answered with a warning (`skyeye.warning` and
  the X-SkyEye-Warning header), or refused with 422 under `unapproved_tasks: refuse`.
- Canary and shadow (router.py): the same class serves production and the candidate side by
  side; `role` says which (what /metrics labels and the inference log record), and the
  router reaches it through `handle_chat` (the request's headers and body, not a socket).
- The limits and batching reach the replicas as the deployment's `user_config`
  (`reconfigure`). A deploy under the same app name, of a new version or new limits, rolls
  the replicas: the old ones answer until the new ones are ready (`max_surge_percent`).
- The inference log: every answered or refused chat request is a row handed to the
  replica's writer (`inference_log`), which writes batches off the request path; the
  replica's shutdown (Ray Serve calls `__del__`) writes what is left.
"""

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..evaluation.baselines import TRIVIAL
from ..formats.benchmarks import PRIMARY
from ..formats.prompts import task_of
from ..model.references import load, model_name
from ..tracking import runs
from ..tracking.names import TAG_APPROVED_TASKS, TAG_DVC_MD5, TAG_EVAL_RUN, read_approved
from .config import ServeConfig
from .engine import Engine
from .inference_log import InferenceLog, identifier_of
from .inference_log import metrics as log_metrics
from .media import load_image
from .protocol import APIError, ChatCompletionRequest, Conversation, chunks, completion, conversation

WARNING_HEADER = "X-SkyEye-Warning"
VERSION_HEADER, ROLE_HEADER = "X-SkyEye-Version", "X-SkyEye-Role"  # which version answered, and as what
# the router's id of a request, which a shadow copy shares with production's answer (Ray Serve's proxy
# owns X-Request-Id)
REQUEST_ID_HEADER = "X-SkyEye-Request-Id"
ROLES = ("production", "candidate", "shadow")
logger = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, the body of every refusal."""
    error: ErrorBody


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "a malformed or refused request; `param` names the field"), (401, "missing or wrong API key"),
    (413, "body over the size limit"), (422, "a task the served version is not approved for (unapproved_tasks)"),
    (429, "queue full; see Retry-After"), (500, "internal error"), (503, "no model loaded"),
    (504, "no answer in time"))}


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_error(errors: list[dict]) -> APIError:
    """Pydantic's first complaint as a 400 naming the field (`messages[0].role`)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "the body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)


def _metrics(version: str, role: str) -> dict[str, Any]:
    """The replica's metrics, labelled with the version it serves and its role: beside a
    candidate (router.py) both versions' figures appear in one /metrics."""
    registry, labels = CollectorRegistry(), ["version", "role"]
    logged = log_metrics(registry, version, role)
    out = {"registry": registry,
           "requests": Counter("skyeye_requests", "HTTP requests by status", ["status", *labels], registry=registry),
           "latency": Histogram("skyeye_request_latency_seconds", "Chat completion latency", labels,
                                registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
           "batch": Histogram("skyeye_batch_size", "Conversations per generation", labels, registry=registry,
                              buckets=(1, 2, 4, 8, 16, 32, 64)),
           "tokens": Counter("skyeye_generated_tokens", "Answer tokens generated", labels, registry=registry),
           "in_flight": Gauge("skyeye_requests_in_flight", "Chat requests admitted and not yet answered", labels,
                              registry=registry), **logged}
    for key in ("latency", "batch", "tokens", "in_flight"):  # bound once: their call sites need no labels
        out[key] = out[key].labels(version=version, role=role)
    return out


def build_app(server: "SkyEyeReplica") -> FastAPI:
    """The replica's HTTP app: the API's routes over `server`, OpenAI-shaped errors, the
    OpenAPI schema, and the web demo at /ui. Built in the replica (Ray Serve calls
    `__serve_build_asgi_app__`), so the routes reach the replica's state directly."""
    app = FastAPI(title="SkyEyeGPT", version="1",
                  description="SkyEyeGPT, remote-sensing multimodal LLM, behind the OpenAI chat-completions API.")
    _add_error_handlers(app)
    add_routes(app, server)
    app.openapi = lambda: _openapi_schema(app)
    from . import web  # gradio is heavy: only replicas load it
    web.mount(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, FastAPI's or an unexpected one, as an OpenAI-shaped error body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(_validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return _error(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))


def add_routes(app: FastAPI, backend: Any) -> None:
    """The API over `backend`: a replica (SkyEyeReplica, below) or the router of a canary or
    shadow app (router.py), each with health, authorize and the coroutines models, metrics_text
    and chat: health, models, Prometheus metrics and chat completions (/ leads to the web demo)."""

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse("/ui/")

    @app.get("/health", responses={503: ERRORS[503]})
    async def health():
        return backend.health()

    @app.get("/v1/models", responses={k: ERRORS[k] for k in (401, 500)})
    async def models(request: Request):
        backend.authorize(request)
        return await backend.models()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(await backend.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(request: Request):
        return await backend.chat(request)


def authorize(request: Request, config: ServeConfig) -> None:
    """401 unless the request holds the API key (when `config.api_key_env` names one that is set)."""
    key = os.environ.get(config.api_key_env)
    sent = request.headers.get("authorization", "")
    if key and not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                       type="authentication_error", code="invalid_api_key")


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the chat request's body documented (the handler reads the body
    itself, to check its size and the API key first); built once."""
    if app.openapi_schema:
        return app.openapi_schema
    out = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = out.setdefault("components", {}).setdefault("schemas", {})
    components.update(body.pop("$defs", {}))
    components["ChatCompletionRequest"] = body
    out["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}
    app.openapi_schema = out
    return out


class SkyEyeReplica:
    """One replica: the model of `model_uri`, loaded before the replica takes traffic. Deployed
    as `SkyEyeServer` (below) it is the API's ingress; as `SkyEyeVersion`, one of the two
    versions behind the router (router.py; an application has one HTTP ingress)."""

    def __init__(self, model_uri: str, log_store: str | None = None, role: str = "production"):
        if role not in ROLES:
            raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
        self.role = role  # production, or the candidate beside it (canary or shadow): logged and labelled
        loaded = load(model_uri)
        name = model_name()
        tags = runs.client().get_model_version(name, str(loaded.version)).tags if loaded.version else {}
        approved = read_approved(tags)
        if approved is None:  # a model folder, or a version registered before approvals were recorded
            logger.warning("%s has no %s tag: approved for no task, every task question gets a warning (or is "
                           "refused)", model_uri, TAG_APPROVED_TASKS)
        lineage = {"model": name, "version": loaded.version, "uri": model_uri, "data_dvc_md5": tags.get(TAG_DVC_MD5),
                   "eval_run": tags.get(TAG_EVAL_RUN), "training_run": loaded.training_run or None,
                   "approved_tasks": approved}
        self.engine = Engine(loaded.model, lineage)
        self.served = {name} | ({f"{name}/{loaded.version}"} if loaded.version else set())
        self.in_flight, self.created = 0, int(time.time())
        self.idle = asyncio.Event()  # no generation running
        self.idle.set()
        self.config, self.metrics = ServeConfig(), _metrics(str(loaded.version or ""), role)
        self.log_store, self.log, self.logs_started = log_store, None, 0
        try:  # the log's file names: <replica>.<writer>-<seq>.parquet
            self.writer_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - built outside a replica
            self.writer_id = uuid.uuid4().hex[:8]

    def reconfigure(self, config: dict) -> None:
        """The limits and batching of this deployment (Ray Serve calls this after __init__)."""
        self.config = ServeConfig.model_validate(config)
        self._batched.set_max_batch_size(self.config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.config.batch_wait_s)
        wanted = self.config.inference_log
        if self.log is None or self.log.cfg != wanted:
            self._close_log()
            if wanted.enabled and self.log_store:  # a new writer counts its files from 0: a name of its own
                self.log = InferenceLog(self.log_store, wanted, f"{self.writer_id}.{self.logs_started}", self.metrics)
                self.logs_started += 1

    def _close_log(self) -> None:
        log, self.log = getattr(self, "log", None), None
        if log is not None and not log.close():
            logger.error("the inference log at %s was not flushed in time", log.store)

    def __del__(self) -> None:
        """Ray Serve's replica shutdown (after the requests in flight): the log's last rows written."""
        self._close_log()

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no model loaded")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self)

    def health(self):
        if self.engine is None:
            return _error(APIError(503, "no model loaded yet", type="server_error"))
        return {"status": "ok", "version": self.engine.lineage["version"]}

    async def models(self) -> dict[str, Any]:  # async as the router's: one route table awaits both
        lineage = self.engine.lineage
        return {"object": "list", "data": [
            {"id": served, "object": "model", "created": self.created, "owned_by": "skyeye", "root": lineage["uri"],
             "max_model_len": self.engine.model.context_length(), "skyeye": lineage} for served in sorted(self.served)]}

    def authorize(self, request: Request) -> None:
        authorize(request, self.config)

    def unapproved(self, question: str) -> str | None:
        """The warning a question earns when its task is one the served version is not approved for."""
        task, lineage = task_of(question), self.engine.lineage
        approved = lineage["approved_tasks"]
        if task is None or task in (approved or ()):
            return None
        served = f"version {lineage['version']}" if lineage["version"] else lineage["uri"]
        if approved is None:
            return f"{served} is not approved for {task}: it carries no approval (no {TAG_APPROVED_TASKS} tag)"
        return (f"{served} is not approved for {task}: its {PRIMARY[task]} is not significantly above the "
                f"{TRIVIAL[task]} baseline on every {task} split (approved for: {', '.join(approved) or 'no task'})")

    async def _body(self, request: Request) -> ChatCompletionRequest:
        """The request body, read only once the size allows it, parsed and typed."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        try:
            return ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as err:
            raise _validation_error(err.errors()) from None

    async def chat(self, request: Request):
        status, started, seen = 500, time.perf_counter(), {}
        try:
            response = await self._chat(request, seen)
            status = response.status_code
            return response
        except APIError as err:
            status, seen["error"] = err.status, err.message
            raise
        except Exception as err:
            seen["error"] = f"internal error: {type(err).__name__}: {err}"
            raise
        finally:
            self.metrics["requests"].labels(status=str(status), version=str(self.engine.lineage["version"] or ""),
                                            role=self.role).inc()
            self._log(seen, status, time.perf_counter() - started)

    async def handle_chat(self, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """A chat request the router passes on (its headers and body): answered as over HTTP, the
        response as (status, headers, body), errors included."""
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
                 "query_string": b"", "http_version": "1.1", "scheme": "http", "server": None, "client": None}
        try:
            response = await self.chat(Request(scope, receive))
        except APIError as err:
            response = _error(err)
        except Exception as err:  # noqa: BLE001 - as the HTTP app's own handler: a 500 with OpenAI's body
            response = _error(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
        if isinstance(response, StreamingResponse):
            content = b"".join([c.encode() if isinstance(c, str) else c async for c in response.body_iterator])
        else:
            content = response.body
        if response.background is not None:  # what HTTP would run after sending (a log write, say)
            await response.background()
        out = {k: v for k, v in response.headers.items() if k != "content-length"}
        return response.status_code, out, content

    async def metrics_text(self) -> bytes:
        return generate_latest(self.metrics["registry"])

    def _log(self, seen: dict[str, Any], status: int, latency_s: float) -> None:
        """The request's row to the writer: only a dict on a queue here, never an error for the request."""
        if self.log is None:
            return
        try:
            conv, answer, lineage = seen.get("conv"), seen.get("answer"), self.engine.lineage
            question = conv.question if conv else None
            self.log.record({
                "time": datetime.now(UTC), "request_id": conv.id if conv else f"chatcmpl-{uuid.uuid4().hex}",
                "model": lineage["model"], "version": lineage["version"], "role": self.role,
                "task": identifier_of(question) if question else None, "prompt": question,
                "prompt_chars": len(question) if question else None,
                "prompt_tokens": answer.prompt_tokens if answer else seen.get("prompt_tokens"),
                "image_signature": answer.signature if answer else None,
                "answer": answer.text if answer else None,
                "boxes": json.dumps(answer.skyeye.get("boxes", [])) if answer else None,
                "completion_tokens": answer.completion_tokens if answer else None,
                "finish_reason": answer.finish_reason if answer else None,
                "latency_ms": latency_s * 1000, "status": status, "error": seen.get("error")},
                conv.images[0] if conv and conv.images else None)
        except Exception:  # noqa: BLE001 - the log never fails a request
            logger.exception("inference log: the row of a request not recorded")

    async def _chat(self, request: Request, seen: dict[str, Any]):
        self.authorize(request)
        cfg, started = self.config, time.perf_counter()
        body = await self._body(request)
        if self.in_flight >= cfg.queue_limit:
            raise APIError(429, f"the server is at its limit of {cfg.queue_limit} requests; retry after "
                                f"{cfg.retry_after_s} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(cfg.retry_after_s)})
        self.in_flight += 1
        self.metrics["in_flight"].set(self.in_flight)
        try:
            # decoding images and counting tokens in a thread: the event loop keeps taking requests
            conv = await asyncio.get_running_loop().run_in_executor(None, self._conversation, body, seen)
            self._request_id(request, conv)
            warning = self.unapproved(conv.question)
            if warning and cfg.unapproved_tasks == "refuse":
                raise APIError(422, f"{warning}; this server refuses such questions (unapproved_tasks: refuse)",
                               param="messages", code="unapproved_task")
            try:
                answer = await asyncio.wait_for(self._answer(conv), timeout=cfg.request_timeout_s)
            except TimeoutError:
                raise APIError(504, f"no answer within {cfg.request_timeout_s} s", type="timeout_error",
                               code="timeout") from None
        finally:
            self.in_flight -= 1
            self.metrics["in_flight"].set(self.in_flight)
        seen["answer"] = answer
        self.metrics["latency"].observe(time.perf_counter() - started)
        self.metrics["tokens"].inc(answer.completion_tokens)
        headers = {VERSION_HEADER: str(self.engine.lineage["version"] or ""), ROLE_HEADER: self.role}
        if warning:
            headers[WARNING_HEADER] = warning
            answer.skyeye["warning"] = warning
        if conv.stream:
            pieces = re.findall(r"\s*\S+", answer.text) or [answer.text]
            events = [f"data: {json.dumps(c)}\n\n" for c in chunks(conv, answer, body.model, pieces)]
            return StreamingResponse(iter(events + ["data: [DONE]\n\n"]), media_type="text/event-stream",
                                     headers=headers)
        return JSONResponse(completion(conv, answer, body.model), headers=headers)

    def _conversation(self, body: ChatCompletionRequest, seen: dict[str, Any] | None = None) -> Conversation:
        """The request as a conversation; what is known of it goes into `seen` (for the log) as it is learnt."""
        cfg, seen = self.config, {} if seen is None else seen
        conv = conversation(body, served=self.served, max_frames=self.engine.max_frames,
                            max_messages=cfg.max_messages, max_tokens_limit=cfg.max_tokens_limit,
                            default_max_tokens=cfg.default_max_tokens or min(self.engine.max_new_tokens,
                                                                             cfg.max_tokens_limit),
                            load_image=self._image)
        seen["conv"] = conv  # from here on the log keeps the question, even of a refused request
        seen["prompt_tokens"] = self.engine.prompt_tokens(conv)  # a refusal for length logs it too
        self.engine.check_fits(conv, seen["prompt_tokens"])
        return conv

    @staticmethod
    def _request_id(request: Request, conv: Conversation) -> None:
        """The router's id for the request, where it sent one: a shadow copy and production's
        answer then share it (the response's id, and the inference log's request_id)."""
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        if re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", sent):
            conv.id = sent

    def _image(self, url: str, param: str):
        return load_image(url, param, max_pixels=self.config.max_image_pixels,
                          allowed=self.config.allowed_local_media_path)

    async def _answer(self, conv: Conversation):
        # Ray Serve closes a batch batch_wait_s after its first request even while a generation
        # runs, which leaves the next generations with the few requests of one short window.
        # Held back until the generation ends, the requests that came meanwhile form one batch.
        await self.idle.wait()
        return await self._batched(conv)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, convs: list[Conversation]):
        """Ray Serve hands over the conversations that arrived together; one generation answers them."""
        self.metrics["batch"].observe(len(convs))
        self.idle.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.answer, convs)
        finally:
            self.idle.set()


SkyEyeServer = serve.deployment(name="SkyEyeGPT", max_surge_percent=100)(serve.ingress()(SkyEyeReplica))
SkyEyeVersion = serve.deployment(name="SkyEyeGPTVersion", max_surge_percent=100)(SkyEyeReplica)
