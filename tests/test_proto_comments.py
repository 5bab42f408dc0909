"""The proto comments are the API's documentation for clients: they must say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from headwise.cache.codec import FRAME_OVERHEAD
from headwise.policies import policy_names
from services.settings import Settings

PROTO = Path(__file__).resolve().parent.parent / "proto" / "headwise" / "v1"


def comment_before(text: str, decl: str) -> str:
    """The comment lines right above the first field declared as `decl` ("type name")."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if re.match(rf"\s*{decl} = \d+;", line))
    out = []
    while i > 0 and lines[i - 1].strip().startswith("//"):
        i -= 1
        out.insert(0, lines[i].strip()[2:].strip())
    return " ".join(out)


def test_the_policy_comment_names_every_registered_policy_and_the_default():
    c = comment_before((PROTO / "generate.proto").read_text(), "string policy")
    assert sorted(re.findall(r'"(\w+)"', c)) == sorted(policy_names())
    assert f'"{Settings().default_policy}" (the default)' in c


def test_kept_and_max_new_tokens_say_what_the_server_does():
    text = (PROTO / "generate.proto").read_text()
    assert "0 = the server's default" in comment_before(text, "float kept")
    mnt = comment_before(text, "uint32 max_new_tokens")
    assert "HEADWISE_MAX_NEW_TOKENS" in mnt and f"({Settings().max_new_tokens} by" in mnt and "8192" not in mnt


def test_the_frame_header_size_and_the_header_contents():
    text = (PROTO / "kvstore.proto").read_text()
    assert f"{FRAME_OVERHEAD}-byte frame header" in comment_before(text, "bytes data")
    header = comment_before(text, "bytes header")
    assert "No chunk CRC is in it" in header
