"""Real text that is on every machine: CPython's pydoc topics (Lib/pydoc_data/topics.py)."""

from __future__ import annotations

DEFAULT_TOPICS = ("assert", "assignment", "atom-identifiers", "atom-literals", "attribute-access",
                  "augassign", "binary", "bitwise", "booleans", "break", "callable-types", "calls",
                  "class", "comparisons", "compound", "context-managers", "continue", "conversions")


def pydoc_topics() -> dict[str, str]:
    import pydoc_data.topics as t

    return dict(t.topics)


def document(topics: tuple[str, ...] = DEFAULT_TOPICS) -> str:
    """A long document: the given pydoc topics, in order, separated by blank lines."""
    all_topics = pydoc_topics()
    return "\n\n".join(all_topics[name].strip() for name in topics if name in all_topics)


def document_tokens(tokenizer, num_tokens: int, topics: tuple[str, ...] | None = None) -> str:
    """A real document cut to about num_tokens tokens (at a line boundary)."""
    names = topics or tuple(sorted(pydoc_topics()))
    text = document(names)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= num_tokens:
        return text
    cut = tokenizer.decode(ids[:num_tokens])
    return cut[: cut.rfind("\n")] if "\n" in cut else cut
