from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from headwise.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; seed makes sampling repeatable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 8192:
            raise InvalidInput(f"max_new_tokens={self.max_new_tokens!r} is outside the allowed range [1, 8192]")
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidInput(f"temperature={self.temperature!r} is outside the allowed range [0, 10]")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p={self.top_p!r} is outside the allowed range (0, 1]")


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V]: greedy at temperature 0, else temperature + nucleus."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        cut = (cum - sorted_p) >= params.top_p  # drop tokens outside the nucleus
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
