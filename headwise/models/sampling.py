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


class TokenPicker:
    """One sequence's choice of tokens: sampling with its own seeded generator, then the stop rule.

    `pick(logits)` returns the next token; `done` tells whether the sequence ends with it: EOS
    (unless ignore_eos), max_new_tokens reached, or the text ending with a stop string (the token
    that completed it is still returned). `ModelRunner.generate` and the decode batcher both pick
    through it, so a batched stream gives the tokens the one-sequence reference gives.
    """

    def __init__(self, params: SamplingParams, eos_ids: frozenset[int], tokenizer=None):
        self.params, self.eos_ids, self.tokenizer = params, eos_ids, tokenizer
        self.generator = torch.Generator(device="cpu").manual_seed(params.seed)
        self.out: list[int] = []
        self.done = False

    def pick(self, logits: Tensor) -> int:
        """The next token from logits [V]; sets `done` when the sequence ends with it."""
        tok = sample(logits.cpu(), self.params, self.generator)
        self.out.append(tok)
        p = self.params
        self.done = len(self.out) >= p.max_new_tokens or (tok in self.eos_ids and not p.ignore_eos)
        if not self.done and p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(self.out[-32:], skip_special_tokens=True)
            self.done = any(s in text for s in p.stop)
        return tok
