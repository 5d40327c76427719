"""Incremental detokenisation: the text each new token adds, never splitting a multi-byte character.

The concatenated pieces equal ``tokenizer.decode(all_ids, skip_special_tokens=True)``. Fast tokenizers use
the ``tokenizers`` library's ``DecodeStream``; others re-decode a short window (prefix/read offsets, as
vLLM does) and hold text back while it ends in an incomplete character.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class Detokenizer:
    """Per-request streaming decoder."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream: Any = None
        if backend is not None:
            stream_class = _decode_stream_class()
            if stream_class is not None:
                self._backend = backend
                self._stream = stream_class(skip_special_tokens=True)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._window_step(token_id)

    def _window_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        full_text = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text):]
        return ""


def _decode_stream_class() -> Any:
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # pragma: no cover - tokenizers < 0.21 has no streaming decoder
        return None
    return DecodeStream
