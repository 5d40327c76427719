"""Stop strings held back while streaming, and error messages without file-system paths (no model)."""

from __future__ import annotations

import pytest
from persona_router.adapters.stop_strings import StopStrings, truncate_at_stop
from persona_router.core.errors import AdapterError, ConfigError, InvalidRequestError, public_message, redact_paths


def stream(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStrings(stops)
    sent = []
    for piece in pieces:
        text, reached = matcher.feed(piece)
        sent.append(text)
        if reached:
            return "".join(sent), True
    return "".join(sent) + matcher.flush(), False


@pytest.mark.parametrize(("pieces", "expected"), [
    (["Hello wor", "ld. END more"], ("Hello world. ", True)),
    (["Hello E", "N", "D"], ("Hello ", True)),          # split over three pieces: no part of it is sent
    (["Hello E", "N", "x"], ("Hello ENx", False)),      # looked like one, was not: sent in full
    (["ab", "c"], ("abc", False)),
    (["xEN"], ("xEN", False)),                          # held back, then flushed at the end
    (["END"], ("", True)),
    (["a\\nb", "STOP!"], ("a\\nb", True)),
])
def test_stop_strings_stream(pieces: list[str], expected: tuple[str, bool]) -> None:
    assert stream(("END", "STOP"), pieces) == expected
    assert truncate_at_stop("".join(pieces), ("END", "STOP")) == expected[0] or not expected[1]


def test_earliest_stop_wins_and_nothing_is_held_too_long() -> None:
    matcher = StopStrings(("bc", "abcd"))
    assert matcher.feed("xa") == ("x", False)  # 'a' could start 'abcd'
    assert matcher.feed("bc") == ("a", True)   # 'bc' occurs first
    assert truncate_at_stop("xabc", ("abcd", "bc")) == "xa"  # the text generation stopped at
    assert truncate_at_stop("xabcd", ("abcd", "bc")) == "x"


@pytest.mark.parametrize("stops", [("a", "b", "c", "d", "e"), ("",), ("x" * 300,)])
def test_stop_string_limits(stops: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        StopStrings(stops)
    assert info.value.field == "stop"


def test_public_messages_name_no_paths() -> None:
    error = AdapterError("corrupt adapter weights ([Errno 2] No such file or directory: "
                         "'/srv/my models/adapters/student/2/adapter_model.safetensors')",
                         path="/srv/adapters/student/2", field="r")
    assert str(error).startswith("/srv/adapters/student/2: ")  # the log keeps the location
    assert public_message(error) == ("field 'r': corrupt adapter weights ([Errno 2] No such file or directory: "
                                     "'adapter_model.safetensors')")
    assert public_message(InvalidRequestError("must not be empty", field="question")) == (
        "field 'question': must not be empty")
    text = "trained on base '/home/u/.cache/persona-router/models/x' at /tmp/a/b/c; see GET /v1/models or http://h/a/b"
    assert redact_paths(text) == "trained on base 'x' at c; see GET /v1/models or http://h/a/b"
