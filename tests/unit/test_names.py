"""The typed adapter key (``core/names.py``): construction checks, str/parse round trip, ordering."""

from __future__ import annotations

import pytest
from persona_router.core.errors import ConfigError
from persona_router.core.names import AdapterKey


def test_round_trip_and_fields() -> None:
    key = AdapterKey("general-reader", 12)
    assert str(key) == "general-reader@12"
    assert AdapterKey.parse(str(key)) == key
    assert (key.persona, key.version) == ("general-reader", 12)
    assert sorted([AdapterKey("b", 1), AdapterKey("a", 2), AdapterKey("a", 1)]) == [
        AdapterKey("a", 1), AdapterKey("a", 2), AdapterKey("b", 1)]
    assert len({AdapterKey("a", 1), AdapterKey.parse("a@1")}) == 1  # usable as a dict key


@pytest.mark.parametrize(("text", "field"), [
    ("student", "adapter"), ("student@", "version"), ("student@0", "version"), ("student@v2", "version"),
    ("student@01", "version"), ("Student@1", "persona"), ("../x@1", "persona"), ("@1", "persona"),
])
def test_parse_names_the_bad_part(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        AdapterKey.parse(text)
    assert info.value.field == field


def test_construction_validates() -> None:
    with pytest.raises(ConfigError):
        AdapterKey("student", 0)
    with pytest.raises(ConfigError):
        AdapterKey("student", True)  # a bool is not a version
