"""The alignment layer, the only new module of SkyEyeGPT: every `group` consecutive
visual tokens are concatenated, then one linear layer maps them to the LLM width
(paper: 1024 tokens x 1408 -> 256 x 5632 -> 256 x 4096). No extra encoding modules."""
from __future__ import annotations

import torch
from torch import nn


class AlignmentLayer(nn.Module):
    def __init__(self, vision_width: int, llm_width: int, group: int = 4):
        super().__init__()
        self.group = group
        self.proj = nn.Linear(vision_width * group, llm_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape  # (B, N, D)
        if n % self.group:
            raise ValueError(f"{n} visual tokens do not split into groups of {self.group}")
        return self.proj(tokens.reshape(b, n // self.group, d * self.group))  # (B, N/group, H)
