"""The prompt template, image placeholder splice and label masking (MiniGPT-v2 / LLaMA-2
chat format, as the paper's figures show):

    <s>[INST] <Img><ImageHere></Img> [task] instruction [/INST] answer</s>[INST] next [/INST] answer</s>

`<ImageHere>` is expanded to one placeholder token per visual embedding; the model
writes the projected visual tokens into those positions. The image appears once, in
the first turn. Loss falls on answers (and their end-of-sequence token) only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.prompts import IMAGE_PLACEHOLDER
from .tokenizer import IMAGE_TOKEN

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _expand_image(tok, ids: list[int], n_visual: int) -> list[int]:
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    out: list[int] = []
    for i in ids:
        out += [image_id] * n_visual if i == image_id else [i]
    return out


def prompt_text(question: str) -> str:
    return f"[INST] {question} [/INST] "


def encode_conversation(tok, turns: list[tuple[str, str]], n_visual: int, max_length: int | None = None) -> Encoded:
    """Token ids and labels for a whole conversation; prompts are masked with -100."""
    ids, labels = [tok.bos_token_id], [IGNORE]
    for i, (question, answer) in enumerate(turns):
        if i == 0 and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER} {question}"
        q = _expand_image(tok, _ids(tok, prompt_text(question)), n_visual)
        # answers (model-written ones in a history, too) never open an image slot
        a = _ids(tok, answer.replace(IMAGE_TOKEN, "")) + [tok.eos_token_id]
        ids += q + a
        labels += [IGNORE] * len(q) + a
    if max_length and len(ids) > max_length:
        # Never cut into the image: a sample whose prompt alone is too long is refused upstream.
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels)


def encode_prompt(tok, history: list[tuple[str, str]], question: str, n_visual: int) -> list[int]:
    """Ids for generation: earlier turns (with answers) and the new question, ending at [/INST]."""
    enc = encode_conversation(tok, history, n_visual) if history else Encoded([tok.bos_token_id], [IGNORE])
    if not history and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER} {question}"
    return enc.input_ids + _expand_image(tok, _ids(tok, prompt_text(question)), n_visual)


def collate(batch: list[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest; right padding for training, left padding for generation."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, sl] = torch.tensor(e.input_ids)
        if len(e.labels) == n:  # prompts for generation carry no labels
            labels[row, sl] = torch.tensor(e.labels)
        mask[row, sl] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
