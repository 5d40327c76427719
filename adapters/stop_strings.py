"""Stop strings (OpenAI's ``stop``), applied by the engines to the text as it streams.

Generation ends at the first occurrence of any stop string; neither it nor anything after it is sent.
Streaming-safe: text that could be the beginning of a stop string is held back until the next tokens
show whether it is one (then it is dropped) or not (then it is sent), so a client never receives part of
a stop string.
"""

from __future__ import annotations

from persona_router.core.errors import ConfigError

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


def check_stop_strings(stops: tuple[str, ...]) -> tuple[str, ...]:
    if len(stops) > MAX_STOP_STRINGS:
        raise ConfigError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", field="stop")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise ConfigError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", field="stop")
    return stops


class StopStrings:
    """One request's stop-string state: ``feed`` each new piece of text, ``flush`` at the end."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = check_stop_strings(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string was reached)."""
        buffer = self._held + text
        hits = [index for index in (buffer.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            self._held = ""
            return buffer[:min(hits)], True
        keep = max((_overlap(buffer, stop) for stop in self.stops), default=0)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """Generation ended otherwise (length): the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return held


def truncate_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any stop string (the whole text if none occurs)."""
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return text[:min(hits)] if hits else text


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
