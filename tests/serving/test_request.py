"""Request validation: every bad field is INVALID_ARGUMENT naming the allowed values."""

from __future__ import annotations

import pytest

from headwise.policies import policy_names
from services.decode.request import check_request
from services.errors import ServiceError
from services.policy import resolve_policy
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings

S = Settings(max_new_tokens=256)


def bad(**fields) -> str:
    with pytest.raises(ServiceError) as e:
        check_request(pb.GenerateRequest(**({"prompt": "q"} | fields)), S)
    assert e.value.code == "INVALID_ARGUMENT"
    return e.value.message


def test_defaults():
    p = check_request(pb.GenerateRequest(prompt="q"), S)
    assert p.max_new_tokens == 64 and p.temperature == 0.0 and p.top_p == 1.0


def test_unknown_policy_lists_allowed():
    msg = bad(policy="nope")
    assert "nope" in msg and all(name in msg for name in policy_names())


@pytest.mark.parametrize("kept", [1.5, -0.1, float("nan")])
def test_bad_kept_names_range(kept):
    assert "(0, 1]" in bad(policy="streaming", kept=kept)


@pytest.mark.parametrize("fields,needle", [
    ({"max_new_tokens": 100000}, "[1, 256]"),
    ({"temperature": 11.0}, "[0, 10]"),
    ({"top_p": 1.5}, "(0, 1]"),
    ({"stop": ["x"] * 17}, "at most 16"),
    ({"stop": [""]}, "1 to 256 bytes"),
    ({"session_id": "s" * 200}, "128 bytes"),
    ({"prompt": "  "}, "prompt is empty"),
])
def test_bad_fields(fields, needle):
    assert needle in bad(**fields)


def test_the_server_defaults_apply_to_empty_fields():
    p = resolve_policy("", 0.0, "streaming", 0.5)
    assert (p.name, p.kept) == ("streaming", 0.5)
