"""The prompt template, image placeholder splice and label masking (MiniGPT-v2 / LLaMA-2
chat format, as the paper's figures show):

    <s>[INST] <Img><ImageHere></Img> [task] instruction [/INST] answer</s>[INST] next [/INST] answer</s>

`<ImageHere>` is expanded to one placeholder token per visual embedding; the model
writes the projected visual tokens into those positions. The image appears once, in
the first turn. Loss falls on answers (and their end-of-sequence token) only.

Two styles (`ModelConfig.template`):
- `skyeyegpt`: the tiny tokenizer holds the markers, the image slot and the coordinates as
  tokens; the whole text is tokenized at once.
- `minigpt_v2`: what MiniGPT-v2's code computes with LLaMA-2's own tokenizer, which has none
  of those tokens (`minigpt4/models/minigpt_base.py`): the text is cut at `<ImageHere>` and
  each piece tokenized alone, the visual tokens going between the pieces. Training is
  `preparing_embedding` + `forward` (BOS, the prompt `[INST] ... [/INST]` with no special
  tokens, each answer followed by the end symbol `</s>`, later turns opened by `<s>[INST]`);
  generation is `Chat` / `eval_utils.prepare_texts` + `get_context_emb`: the conversation
  text `<s>[INST] <Img><ImageHere></Img> q [/INST]` (answers glued to `[/INST]`), its first
  piece tokenized with special tokens, so the prompt opens with two BOS, as theirs does.
  The image slots hold the unknown token's id (LLaMA's byte fallback never emits it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.prompts import IMAGE_PLACEHOLDER
from .tokenizer import IMAGE_TOKEN

IGNORE = -100
SKYEYEGPT, MINIGPT_V2 = "skyeyegpt", "minigpt_v2"
TEMPLATES = (SKYEYEGPT, MINIGPT_V2)
END_SYM = "</s>"  # MiniGPT-v2's end_sym (eval configs): an answer's text is followed by it


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


def slot_id(tok, template: str = SKYEYEGPT) -> int:
    """The id written where visual tokens go."""
    return tok.unk_token_id if template == MINIGPT_V2 else tok.convert_tokens_to_ids(IMAGE_TOKEN)


def _with_image(question: str) -> str:
    return question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER} {question}"


def _pieces(tok, text: str, n_visual: int, special_first: bool = False) -> list[int]:
    """MiniGPT-v2's tokenization: each piece between image slots alone, the slots between."""
    out: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            out += [tok.unk_token_id] * n_visual
        out += tok(piece, add_special_tokens=special_first and i == 0).input_ids
    return out


def _encode_minigpt_v2(tok, turns: list[tuple[str, str]], n_visual: int) -> Encoded:
    ids, labels = [tok.bos_token_id], [IGNORE]
    for i, (question, answer) in enumerate(turns):
        prompt = f"[INST] {_with_image(question)} [/INST]" if i == 0 else f"{tok.bos_token}[INST] {question} [/INST]"
        q = _pieces(tok, prompt, n_visual) if i == 0 else _ids(tok, prompt)
        a = _ids(tok, answer.replace(IMAGE_TOKEN, "") + END_SYM)
        ids += q + a
        labels += [IGNORE] * len(q) + a
    return Encoded(ids, labels)


def minigpt_v2_prompt(history: list[tuple[str, str]], question: str, bos: str = "<s>") -> str:
    """The text MiniGPT-v2's conversation template (CONV_VISION_minigptv2) builds."""
    turns = [*history, (question, None)]
    text = ""
    for i, (q, a) in enumerate(turns):
        text += f"{bos}[INST] {_with_image(q) if i == 0 else q} [/INST]" + (a or "")
    return text


def encode_conversation(tok, turns: list[tuple[str, str]], n_visual: int, max_length: int | None = None,
                        template: str = SKYEYEGPT) -> Encoded:
    """Token ids and labels for a whole conversation; prompts are masked with -100."""
    if template == MINIGPT_V2:
        enc = _encode_minigpt_v2(tok, turns, n_visual)
        return Encoded(enc.input_ids[:max_length], enc.labels[:max_length]) if max_length else enc
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


def encode_prompt(tok, history: list[tuple[str, str]], question: str, n_visual: int,
                  template: str = SKYEYEGPT) -> list[int]:
    """Ids for generation: earlier turns (with answers) and the new question, ending at [/INST]."""
    if template == MINIGPT_V2:
        return _pieces(tok, minigpt_v2_prompt(history, question, tok.bos_token), n_visual, special_first=True)
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
