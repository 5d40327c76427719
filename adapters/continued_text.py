"""The text of an answer continued on another pool member after a failure mid-answer.

The next member decodes only what it generates, so its text has two seams with what was already streamed: a
SentencePiece decoder drops the leading space of its first token ("Hello" + "world"), and text the failed
member still held back as a possible stop-string start is gone, so a stop string split across the two
members is never seen. The pool decodes the continuation itself instead, from every token of the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from persona_router.adapters.stop_strings import StopStrings

Decode = Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped (the service's decode)


class ContinuedText:
    """Streaming text for the tokens after ``prior``, consistent with the ``sent`` text already streamed."""

    def __init__(self, decode: Decode, prior: Sequence[int], sent: str, stops: tuple[str, ...]) -> None:
        self._decode = decode
        self._ids = list(prior)
        full = decode(self._ids)
        self._decoded = len(full)
        # What the failed member decoded but had not sent yet (a held possible stop-string start).
        self._pending = _unsent(full, sent)
        self._stops = StopStrings(stops) if stops else None

    def step(self, token_id: int) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached) after one more token."""
        self._ids.append(token_id)
        full = self._decode(self._ids)
        if full.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return "", False
        piece = self._pending + full[self._decoded:]
        self._decoded, self._pending = len(full), ""
        return self._stops.feed(piece) if self._stops is not None else (piece, False)

    def flush(self) -> str:
        """Generation ended without a stop string: what was held back is text after all."""
        held, self._pending = self._pending, ""
        return held + (self._stops.flush() if self._stops is not None else "")


def _unsent(full: str, sent: str) -> str:
    for shown in (sent, sent.lstrip()):  # a member's first token may carry a space a bare decode drops
        if full.startswith(shown):
            return full[len(shown):]
    return ""
