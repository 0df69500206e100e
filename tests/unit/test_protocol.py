from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import RequestError
from agent.protocol import Topics, parse_request, peek_request_id, validate_segment
from tests.support import load_schema

LIMIT = 64 * 1024


def parse(obj: object) -> object:
    return parse_request(json.dumps(obj).encode(), LIMIT)


def test_minimal_chat_request_defaults() -> None:
    req = parse({"id": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert req.id == "a" and req.max_tokens == 256 and req.temperature == 0.0
    assert req.stream is True and req.stop == () and req.deadline_ms is None


def test_prompt_request_with_options() -> None:
    req = parse(
        {
            "id": "b",
            "prompt": "x",
            "max_tokens": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "seed": 3,
            "stop": "\n",
            "ignore_eos": True,
            "stream": False,
            "deadline_ms": 1500,
            "model": "smollm2-135m",
        }
    )
    assert (req.max_tokens, req.top_k, req.seed, req.stop) == (5, 20, 3, ("\n",))
    assert req.ignore_eos and not req.stream and req.deadline_ms == 1500


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"id": "x", "prompt": "p", "messages": [{"role": "user", "content": "c"}]}, "exactly one"),
        ({"id": "x"}, "exactly one"),
        ({"id": "x", "prompt": ""}, "prompt"),
        ({"id": "x", "messages": []}, "messages"),
        ({"id": "x", "messages": [{"role": "robot", "content": "c"}]}, "role"),
        ({"id": "x", "messages": [{"role": "user", "content": 3}]}, "content"),
        ({"id": "x", "prompt": "p", "max_tokens": 0}, "max_tokens"),
        ({"id": "x", "prompt": "p", "max_tokens": True}, "max_tokens"),
        ({"id": "x", "prompt": "p", "max_tokens": 1.5}, "max_tokens"),
        ({"id": "x", "prompt": "p", "max_tokens": 10**12}, "max_tokens"),
        ({"id": "x", "prompt": "p", "temperature": -1}, "temperature"),
        ({"id": "x", "prompt": "p", "top_p": 0}, "top_p"),
        ({"id": "x", "prompt": "p", "stop": [""]}, "stop"),
        ({"id": "x", "prompt": "p", "stream": "yes"}, "stream"),
        ({"id": "x", "prompt": "p", "deadline_ms": 0}, "deadline_ms"),
        ({"id": "x", "prompt": "p", "surprise": 1}, "unknown field"),
        ({"id": "x", "prompt": "p", "schema": "edgelm.infer.request/9"}, "schema"),
    ],
)
def test_bad_fields_name_the_field_and_keep_the_id(obj: dict[str, object], needle: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(obj)
    assert info.value.code == "bad_request"
    assert needle in info.value.message
    assert info.value.request_id == "x"


@pytest.mark.parametrize("rid", ["", "a/b", "a+b", "#", "x" * 129, 5, None])
def test_bad_ids_are_rejected_without_an_id(rid: object) -> None:
    with pytest.raises(RequestError) as info:
        parse({"id": rid, "prompt": "p"})
    assert info.value.request_id is None


def test_too_large_is_checked_before_parsing() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(b"x" * (LIMIT + 1), LIMIT)
    assert info.value.code == "too_large"
    assert info.value.details["payload_bytes"] == LIMIT + 1


def test_peek_request_id() -> None:
    assert peek_request_id(b'{"id": "z", "max_tokens": -1}') == "z"
    assert peek_request_id(b"nope") is None
    assert peek_request_id(b'{"id": "a/b"}') is None


def test_topics() -> None:
    t = Topics("f1", "d1")
    assert t.status == "edgelm/v1/f1/d1/status"
    assert t.request == "edgelm/v1/f1/d1/infer/request"
    assert t.fleet_request == "edgelm/v1/f1/infer/request"
    assert t.response("r1") == "edgelm/v1/f1/d1/infer/response/r1"


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "sp ace"])
def test_segments_reject_wildcards(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_segment("--device", bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(min_size=1, max_size=10), json_values),
        "prompt": st.one_of(st.text(max_size=20), json_values),
        "messages": json_values,
        "max_tokens": st.one_of(st.integers(-10, 5000), json_values),
        "temperature": json_values,
        "stop": json_values,
        "stream": json_values,
        "deadline_ms": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(request_like)
def test_fuzz_parse_accepts_exactly_what_the_schema_accepts(obj: dict[str, object]) -> None:
    """Any payload either parses or raises RequestError; never anything else."""
    import jsonschema

    schema = load_schema("infer_request.json")
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(obj)
    try:
        parse(obj)
        parsed = True
    except RequestError as exc:
        assert exc.code == "bad_request"
        parsed = False
    assert parsed == schema_ok, obj


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        parse_request(data, LIMIT)
    except RequestError as exc:
        assert exc.code in ("bad_request", "too_large")
