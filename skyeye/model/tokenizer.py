"""The tiny LLM's tokenizer: byte-level BPE trained with `tokenizers` on the instruction
text, with one token per grid value (`<0>`..`<100>`) and per format marker.

One token per coordinate keeps a box at four tokens (a BPE split of "37" would make
the model spell numbers), and makes `<37>` one embedding that can carry its order.
Saved as an ordinary Hugging Face tokenizer folder, loaded with AutoTokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..formats.boxes import GRID
from ..formats.prompts import IMAGE_PLACEHOLDER, TASK_IDENTIFIERS

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE_TOKEN = "<ImageHere>"
# Markers that must stay whole; not "special" so that decoding keeps them in the text.
MARKERS = ["<Img>", "</Img>", IMAGE_TOKEN, "[INST]", "[/INST]", *TASK_IDENTIFIERS, "<delim>", "<p>", "</p>"]
GRID_TOKENS = [f"<{i}>" for i in range(GRID + 1)]


def grid_lookup(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate tokens' ids in value order (GRID+1,), and per token id its 0-GRID value
    or -1 (a (vocab,) table): training reads boxes straight off label ids with these."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(GRID_TOKENS))
    value_of = torch.full((max(len(tokenizer), int(ids.max()) + 1),), -1, dtype=torch.long)
    value_of[ids] = torch.arange(len(ids))
    return ids, value_of


def instruction_texts(files: Iterable[Path]) -> Iterable[str]:
    for path in files:
        for sample in json.loads(Path(path).read_text()):
            for turn in sample["conversations"]:
                yield turn["value"].replace(IMAGE_PLACEHOLDER, "")


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in MARKERS + GRID_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def load_tokenizer(path: str | Path, template: str = "skyeyegpt"):
    """The LLM's tokenizer. The skyeyegpt template needs its marker tokens; MiniGPT-v2's uses
    LLaMA-2's tokenizer as it is, padding with EOS when it has no pad token (as MiniGPT-v2's
    "$$", never attended to)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if template == "minigpt_v2":
        if tok.bos_token_id is None or tok.eos_token_id is None or tok.unk_token_id is None:
            raise ValueError(f"tokenizer {path}: the minigpt_v2 template needs BOS, EOS and UNK tokens")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok
    missing = [t for t in (IMAGE_TOKEN, "[INST]", "[/INST]")
               if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"tokenizer {path}: lacks the tokens {missing} the SkyEyeGPT template needs")
    return tok
