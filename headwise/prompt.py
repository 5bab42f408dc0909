"""Chat prompts split into segments: the context (document) first, then the question.

The context segment is tokenized on its own, so its tokens (and its compressed cache)
do not depend on the question that follows: that is what makes it reusable. A later turn
of a session is a segment of its own too: the previous answer, the template between turns,
the next question. Both are cut the same way: the chat template is rendered once around
sentinel strings, and the text between the sentinels is the template's part of each segment.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_MARK = "\x00HEADWISE_CONTEXT\x00"
QUESTION_MARK = "\x00HEADWISE_QUESTION\x00"
ANSWER_MARK = "\x00HEADWISE_ANSWER\x00"

# Without a chat template each turn is rendered plainly, as the template would place it.
_PLAIN = {"system": "{}\n\n", "user": "{}\n\nAnswer: ", "assistant": "{}\n\n"}


@dataclass(frozen=True)
class PromptSegments:
    context: list[int]  # template head + document
    question: list[int]  # question + template tail + answer prefix

    @property
    def num_tokens(self) -> int:
        return len(self.context) + len(self.question)


def _cut(tokenizer, messages: list[dict], *marks: str) -> list[str]:
    """The rendered prompt of `messages` (whose contents hold `marks`, in order), cut at each mark:
    len(marks) + 1 pieces of template text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(_PLAIN[m["role"]].format(m["content"]) for m in messages)
    pieces = []
    for mark in marks:
        head, text = text.split(mark)
        pieces.append(head)
    return [*pieces, text]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def build_segments(
    tokenizer, context: str, question: str, answer_prefix: str = "", system: str | None = None
) -> PromptSegments:
    """Render the chat template once, then cut it where the document ends."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"{CONTEXT_MARK}\n\n{QUESTION_MARK}"}]
    head, between, tail = _cut(tokenizer, msgs, CONTEXT_MARK, QUESTION_MARK)
    return PromptSegments(_ids(tokenizer, head + context), _ids(tokenizer, between + question + tail + answer_prefix))


def followup_ids(tokenizer, last_answer: list[int], eos_ids: frozenset[int], question: str, prefix: str) -> list[int]:
    """Tokens of a later turn: the previous answer, the template between turns, the question."""
    msgs = [{"role": "user", "content": CONTEXT_MARK}, {"role": "assistant", "content": ANSWER_MARK},
            {"role": "user", "content": QUESTION_MARK}]
    _, between, tail = _cut(tokenizer, msgs, ANSWER_MARK, QUESTION_MARK)
    answer = list(last_answer)
    if answer and answer[-1] in eos_ids:  # the template between turns writes the end of turn itself
        answer = answer[:-1]
    return answer + _ids(tokenizer, between + question + tail + prefix)
