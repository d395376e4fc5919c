"""The OpenAI chat-completions contract as SkyEye serves it (the shape vLLM and
LLaMA-Factory's `api` expose): the request, its checks, and the response, chunk and
error bodies. A request becomes a `Conversation` the engine answers: one image (or up to
a clip's frames), the turns so far, the last user question.

Every refusal is an `APIError` with OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`) naming the field at fault.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ the request
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="data:image/png|jpeg|tiff;base64,..., or a file under the server's media folder")
    detail: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """What the API reads; fields of OpenAI's request it does not use are ignored."""
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, description="The answer's budget in tokens (max_completion_tokens alike).")
    max_completion_tokens: int | None = None
    temperature: float = Field(0.0, description="0: greedy; up to 2: sampled.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Only 1.")


# ------------------------------------------------------------------ what the engine answers
@dataclass
class Conversation:
    images: list[Image.Image]  # one image, or a clip's frames
    history: list[tuple[str, str]]  # (user, assistant) turns before the question
    question: str
    max_tokens: int
    temperature: float
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _text(content: str | list | None) -> str:
    if isinstance(content, str):
        return content.strip()
    return " ".join(p.text.strip() for p in content or [] if isinstance(p, TextPart)).strip()


def conversation(req: ChatCompletionRequest, *, served: set[str], max_frames: int, max_messages: int,
                 max_tokens_limit: int, default_max_tokens: int, load_image) -> Conversation:
    """The request as a conversation, or the first APIError it earns. `load_image(url, param)`
    turns an image URL into a PIL image (or raises APIError naming `param`)."""
    if req.model not in served:
        raise APIError(400, f"model {req.model!r} is not served here; served: {', '.join(sorted(served))}",
                       param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, "n must be 1", param="n")
    budget = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = default_max_tokens if budget is None else budget
    if not 1 <= budget <= max_tokens_limit:
        raise APIError(400, f"max_tokens must be between 1 and {max_tokens_limit}, got {budget}", param="max_tokens")
    if not 0 <= req.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {req.temperature}", param="temperature")
    if len(req.messages) > max_messages:
        raise APIError(400, f"at most {max_messages} messages, got {len(req.messages)}", param="messages")
    turns = [(i, m) for i, m in enumerate(req.messages) if m.role != "system"]  # the template has no system turn
    images: list[Image.Image] = []
    for i, m in turns:
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if isinstance(part, ImagePart):
                if m.role != "user":
                    raise APIError(400, "images go in user messages", param=f"messages[{i}].content[{j}]")
                if len(images) >= max_frames:
                    raise APIError(400, f"at most {max_frames} image(s) may be provided in one request (one image, "
                                        f"or a clip of up to {max_frames} frames)", param="messages",
                                   code="too_many_images")
                images.append(load_image(part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
    if not images:
        raise APIError(400, "a conversation needs an image: add an image_url part to a user message",
                       param="messages")
    expected = "user"
    for i, m in turns:
        if m.role != expected:
            raise APIError(400, f"messages must alternate user and assistant, starting and ending with user; "
                                f"message {i} is {m.role}", param=f"messages[{i}].role")
        if not _text(m.content):
            raise APIError(400, f"message {i} has no text", param=f"messages[{i}].content")
        expected = "assistant" if expected == "user" else "user"
    if expected == "user":  # the last turn was an assistant's
        raise APIError(400, "the last message must be the user's question", param="messages")
    texts = [_text(m.content) for _, m in turns]
    history = list(zip(texts[:-1:2], texts[1:-1:2], strict=True))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Conversation(images, history, texts[-1], budget, req.temperature, req.stream, include_usage)


# ------------------------------------------------------------------ what the API answers
@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    skyeye: dict[str, Any] = field(default_factory=dict)  # boxes and lineage
    signature: list[float] | None = None  # the first image's encoder signature, for the inference log only


def usage(a: Answer) -> dict[str, int]:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


def completion(conv: Conversation, a: Answer, model: str) -> dict[str, Any]:
    return {"id": conv.id, "object": "chat.completion", "created": conv.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                         "finish_reason": a.finish_reason}],
            "usage": usage(a), "skyeye": a.skyeye}


def chunks(conv: Conversation, a: Answer, model: str, pieces: list[str]) -> list[dict[str, Any]]:
    """The streamed form: a role chunk, one chunk per piece of the answer, a final chunk with
    the finish reason (and `skyeye`), then the usage chunk when asked for."""
    head = {"id": conv.id, "object": "chat.completion.chunk", "created": conv.created, "model": model}
    out = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    out += [{**head, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": a.finish_reason}],
                "skyeye": a.skyeye})
    if conv.include_usage:
        out.append({**head, "choices": [], "usage": usage(a)})
    return out
