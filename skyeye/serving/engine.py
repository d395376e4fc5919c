"""The served model answering a batch of conversations in one generation: grouped by
temperature (greedy ones together), every prompt left-padded into one batch with a KV
cache, each answer cut to its own token budget. Also what an answer says beyond its text:
the boxes it holds (grid and pixels of the sent image) and the model's lineage."""
from __future__ import annotations

from collections import defaultdict
from itertools import accumulate
from typing import Any

import torch

from ..formats.boxes import GRID, phrase_boxes
from ..monitoring.signals import signature_of_tokens
from .protocol import Answer, APIError, Conversation


def boxes_of(text: str, width: int, height: int) -> list[dict[str, Any]]:
    """Each box of an answer, with its phrase, on the 0-100 grid and in pixels of the image."""
    out = []
    for phrase, (x1, y1, x2, y2) in phrase_boxes(text):
        pixels = [round(x1 / GRID * width, 1), round(y1 / GRID * height, 1), round(x2 / GRID * width, 1),
                  round(y2 / GRID * height, 1)]
        out.append({"phrase": phrase, "grid": [x1, y1, x2, y2], "pixels": pixels})
    return out


class Engine:
    """A loaded SkyEyeGPT and what is known of where it comes from (`lineage`)."""

    def __init__(self, model, lineage: dict[str, Any]):
        self.model, self.lineage = model.eval(), lineage

    @property
    def max_frames(self) -> int:
        return int(self.model.cfg.vision.video_frames)

    @property
    def max_new_tokens(self) -> int:
        """The model's own answer budget (its config's max_new_tokens)."""
        return int(self.model.cfg.max_new_tokens)

    def prompt_tokens(self, conv: Conversation) -> int:
        return self.model.prompt_length(conv.question, conv.history, len(conv.images))

    def check_fits(self, conv: Conversation, prompt: int | None = None) -> int:
        """The prompt's length in tokens (`prompt` when counted already); APIError when prompt and
        answer overflow the context."""
        prompt = self.prompt_tokens(conv) if prompt is None else prompt
        context = self.model.context_length()
        if prompt + conv.max_tokens > context:
            raise APIError(400, f"the prompt is {prompt} tokens and max_tokens {conv.max_tokens}: together over the "
                                f"model's context length of {context}", param="messages",
                           code="context_length_exceeded")
        return prompt

    def _count(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False).input_ids

    def answer(self, convs: list[Conversation]) -> list[Answer]:
        """One Answer per conversation, in order."""
        groups: dict[float, list[int]] = defaultdict(list)
        for i, c in enumerate(convs):
            groups[c.temperature].append(i)
        out: list[Answer | None] = [None] * len(convs)
        for temperature, idx in groups.items():
            batch = [convs[i] for i in idx]
            tokens = self._vision(self.model.preprocess([im for c in batch for im in c.images]))
            texts = self.model.ask([c.question for c in batch], [len(c.images) for c in batch], vision_tokens=tokens,
                                   histories=[c.history for c in batch],
                                   max_new_tokens=max(c.max_tokens for c in batch), temperature=temperature)
            # the inference log's image signature: the first image of each conversation, from the same pass
            signatures = signature_of_tokens(tokens)
            firsts = [0, *accumulate(len(c.images) for c in batch)][:-1]
            for i, c, text, first in zip(idx, batch, texts, firsts, strict=True):
                out[i] = self._answer(c, text)
                out[i].signature = signatures[first].tolist()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's tokens (B, N, D), once per batch: the answer and the log's signature."""
        dtype = self.model.llm.get_input_embeddings().weight.dtype  # as `ask` casts pixel values
        return self.model.vision(pixels.to(self.model.device, dtype))

    def _answer(self, conv: Conversation, text: str) -> Answer:
        ids = self._count(text)
        if len(ids) > conv.max_tokens:  # the batch ran to its longest budget; greedy text is a prefix alike
            text = self.model.tokenizer.decode(ids[:conv.max_tokens], skip_special_tokens=True).strip()
            ids = ids[:conv.max_tokens]
        reason = "length" if len(ids) >= conv.max_tokens else "stop"
        width, height = conv.images[0].size
        prompt = self.model.prompt_length(conv.question, conv.history, len(conv.images))
        return Answer(text, prompt, len(ids), reason, {"boxes": boxes_of(text, width, height),
                                                      "lineage": self.lineage})
