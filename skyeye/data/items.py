"""The instruction files read back: one `Item` per sample of a stage-1 / stage-2 file, for
training and for the baselines that learn from the training set."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..formats.prompts import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Item:
    id: str
    source: str
    task: str
    media: str  # path relative to the instruction file's folder
    frames: int  # 1 for an image
    turns: tuple[tuple[str, str], ...]  # (question, answer); placeholder stripped from the first question


def load_items(path: Path) -> list[Item]:
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read instruction file: {err}") from None
    items = []
    for row in rows:
        conv = row["conversations"]
        turns = tuple((conv[i]["value"].replace(IMAGE_PLACEHOLDER, "").strip(), conv[i + 1]["value"])
                      for i in range(0, len(conv) - 1, 2))
        media = row.get("image") or row.get("video")
        items.append(Item(row["id"], row["source"], row["task"], media, int(row.get("frames", 1)), turns))
    return items
