"""Chat prompts split into segments: the context (document) first, then the question.

The context segment is tokenized on its own, so its tokens (and its compressed cache)
do not depend on the question that follows: that is what makes it reusable.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_MARK = "\x00HEADWISE_CONTEXT\x00"
QUESTION_MARK = "\x00HEADWISE_QUESTION\x00"


@dataclass(frozen=True)
class PromptSegments:
    context: list[int]  # template head + document
    question: list[int]  # question + template tail + answer prefix

    @property
    def num_tokens(self) -> int:
        return len(self.context) + len(self.question)


def _render(tokenizer, user: str, system: str | None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + f"{user}\n\nAnswer: "


def build_segments(
    tokenizer, context: str, question: str, answer_prefix: str = "", system: str | None = None
) -> PromptSegments:
    """Render the chat template once, then cut it where the document ends."""
    text = _render(tokenizer, f"{CONTEXT_MARK}\n\n{QUESTION_MARK}", system)
    head, rest = text.split(CONTEXT_MARK)
    between, tail = rest.split(QUESTION_MARK)
    ctx_ids = tokenizer(head + context, add_special_tokens=False).input_ids
    q_ids = tokenizer(between + question + tail + answer_prefix, add_special_tokens=False).input_ids
    return PromptSegments(list(ctx_ids), list(q_ids))
