"""Streamed text that adds up to the stripped answer: a non-streamed answer is ``text.strip()``, so the
stream must not send what the strip removes, or the two would differ for the same request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StrippedStream:
    """Drops leading whitespace and holds trailing whitespace back until more text follows it: the pieces fed
    through ``piece`` concatenate to ``"".join(raw).strip()`` (a held-back run is sent with the next text, and
    dropped if none comes)."""

    started: bool = False
    held: str = ""

    def piece(self, raw: str) -> str:
        if not self.started:
            raw = raw.lstrip()
            if not raw:
                return ""
            self.started = True
        text = self.held + raw
        kept = text.rstrip()
        self.held = text[len(kept):]
        return kept
