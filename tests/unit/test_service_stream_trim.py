"""A streamed answer adds up to the non-streamed one, which is stripped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from persona_router.service.stream_trim import StrippedStream

PIECES = st.lists(st.text(alphabet=st.sampled_from(" \n\tab."), max_size=4), max_size=12)


@given(PIECES)
def test_the_pieces_concatenate_to_the_stripped_text(pieces: list[str]) -> None:
    stream = StrippedStream()
    assert "".join(stream.piece(p) for p in pieces) == "".join(pieces).strip()


def test_inner_whitespace_is_sent_with_the_text_after_it() -> None:
    stream = StrippedStream()
    sent = [stream.piece(p) for p in ("\n", " Hello", " ", "\n", "world", "\n")]
    assert sent == ["", "Hello", "", "", " \nworld", ""]
