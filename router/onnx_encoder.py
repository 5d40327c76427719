"""The router's embedder exported to ONNX and run by ONNX Runtime: the same model, several times faster on CPU.

Why: a routing decision is nearly all the MiniLM forward pass, and at a dozen tokens on one thread torch's
per-operator overhead dominates it. ONNX Runtime runs the exported graph with fused attention and layer-norm
kernels; int8 dynamic quantisation (per-channel weights) shrinks the matrix products further. Measured by
``benchmarks/route_latency.py`` against the torch encoder in the same run.

Export, once per embedder and backend: the sentence-transformers model (transformer and pooling, eager
attention so that ONNX Runtime recognises the attention pattern) is traced to ONNX; for ``onnx`` BERT models
are then fused by ONNX Runtime's transformer optimizer; ``onnx-int8`` instead quantises the traced graph's
weights to int8, per output channel. The export folder
holds ``model.onnx``, the source's ``config.json``, the tokenizer exactly as sentence-transformers configured
it, and ``export.json`` (source id and fingerprint, backend, versions, agreement with torch on probe texts).
It is written atomically into ``$PERSONA_ROUTER_HOME/encoders/`` and copied into each router folder fitted
with it (``encoder/``), whose ``router.json`` records the export's fingerprint: a changed export is a stale
router.

Dynamic quantisation takes each activation's scale from the whole input tensor, so in a padded batch a
question's embedding would depend on its neighbours. The int8 encoder therefore runs one question per call,
unpadded: its embedding is a function of the text alone, whichever way it is batched.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from persona_router.core.atomic import atomic_dir
from persona_router.core.errors import ConfigError, RouterModelError, choices
from persona_router.core.home import home_dir
from persona_router.router.encoder import (
    clip_texts,
    fingerprint_model_files,
    load_sentence_transformer,
    resolve_embedder,
)

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
DEFAULT_BACKEND = "onnx-int8"
EXPORT_FILE = "export.json"
MODEL_FILE = "model.onnx"
EXPORT_FORMAT = 1
OPSET = 17
# Probe texts for the export check: short, punctuated, non-Latin, and one far beyond the 256-token limit.
PROBES = ("renal dose of apixaban at CrCl 25?", "how do I teach fractions to year 4?", "ok",
          "¿Cómo funciona la fotosíntesis? 光合作用是什么？ 🤔", "why is the sky blue " * 200)
# The exported graph must reproduce the torch encoder: float32 to rounding, int8 to within quantisation noise.
MIN_COSINE = {"onnx": 0.99999, "onnx-int8": 0.95}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"{backend!r} is not one of {choices(BACKENDS)}", field="encoder_backend")
    return backend


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("the ONNX encoder backends need onnxruntime and onnx: pip install onnxruntime onnx "
                          "(or fit the router with --encoder-backend torch)", field="encoder_backend") from exc
    return onnxruntime


class OnnxEncoder:
    """An exported embedder folder run by ONNX Runtime on CPU, with normalised float32 embeddings."""

    def __init__(self, folder: str | Path, *, threads: int = 1) -> None:
        self._folder = Path(folder)
        self._meta = read_export(self._folder)
        ort = _onnxruntime()
        options = ort.SessionOptions()
        # One short question is too small to split across threads; the other core stays with the decoder.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self._folder / MODEL_FILE), options,
                                                 providers=["CPUExecutionProvider"])
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._folder)
        except (OSError, ValueError, RuntimeError, *_load_errors()) as exc:  # type: ignore[misc]
            raise RouterModelError(f"cannot load the exported encoder: {exc}", path=self._folder) from exc
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._fingerprint: str | None = None
        self._one_at_a_time = bool(self._meta["quantization"])

    @property
    def model_id(self) -> str:
        return str(self._meta["source"]["id"])

    @property
    def fingerprint(self) -> str:
        """Of the export folder (graph, tokenizer, ``export.json`` naming the source's fingerprint)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model_files(self._folder)
        return self._fingerprint

    @property
    def source_fingerprint(self) -> str:
        return str(self._meta["source"]["fingerprint"])

    @property
    def dimension(self) -> int:
        return int(self._meta["dimension"])

    @property
    def max_seq_length(self) -> int:
        return int(self._meta["max_seq_length"])

    @property
    def backend(self) -> str:
        return str(self._meta["backend"])

    @property
    def folder(self) -> Path:
        return self._folder

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        clipped = clip_texts(texts, self.max_seq_length)
        step = 1 if self._one_at_a_time else max(1, batch_size)
        parts = [self._run(clipped[i:i + step]) for i in range(0, len(clipped), step)]
        vectors = np.concatenate(parts).astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)

    def _run(self, texts: list[str]) -> np.ndarray:
        features = self._tokenizer(texts, padding=True, truncation="longest_first", max_length=self.max_seq_length,
                                   return_tensors="np")
        feed = {name: np.asarray(features[name], dtype=np.int64) for name in self._inputs}
        return np.asarray(self._session.run(None, feed)[0])


def _load_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's errors for a missing, truncated or invalid model file (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "InvalidProtobuf", "InvalidGraph", "RuntimeException")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def read_export(folder: Path) -> dict[str, Any]:
    path = Path(folder) / EXPORT_FILE
    if not path.is_file() or not (Path(folder) / MODEL_FILE).is_file():
        raise RouterModelError(f"not an exported encoder ({EXPORT_FILE} or {MODEL_FILE} missing)", path=folder)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta["format"] != EXPORT_FORMAT:
            raise ValueError(f"format {meta['format']!r}, this version reads {EXPORT_FORMAT}")
        check_backend(meta["backend"])
        missing = [k for k in ("dimension", "max_seq_length", "quantization", "source") if k not in meta]
        if missing or not {"id", "fingerprint"} <= set(meta["source"]):
            raise ValueError(f"missing {missing or 'source id or fingerprint'}")
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise RouterModelError(f"unreadable {EXPORT_FILE}: {exc}", path=path) from exc
    return dict(meta)


def default_export_dir(model_id: str, backend: str, source_fingerprint: str) -> Path:
    # The end of a long id (a local folder's absolute path) keeps the folder's own name within name limits.
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[-80:]
    return home_dir() / "encoders" / f"{slug}-{backend}-{source_fingerprint.removeprefix('sha256:')[:16]}"


def ensure_export(model: str | Path | None, backend: str, *, folder: Path | None = None) -> Path:
    """The export of ``model`` for ``backend``: reused when its ``export.json`` matches, else built (atomic)."""
    check_backend(backend)
    if backend == "torch":
        raise ConfigError("the torch backend runs the model as is; there is nothing to export", field="encoder_backend")
    model_id, source = resolve_embedder(model)
    source_fingerprint = fingerprint_model_files(source)
    target = folder or default_export_dir(model_id, backend, source_fingerprint)
    try:
        meta = read_export(target)
        if meta["backend"] == backend and meta["source"]["fingerprint"] == source_fingerprint:
            return target
        log.info("re-exporting the encoder: %s was made for %s", target, meta["source"]["fingerprint"][:19])
    except RouterModelError:
        pass
    return export_encoder(model_id, source, source_fingerprint, backend, target)


def export_encoder(model_id: str, source: Path, source_fingerprint: str, backend: str, target: Path) -> Path:
    """Trace, fuse, quantise and check the sentence-transformers model in ``source``; write ``target`` atomically."""
    ort = _onnxruntime()
    import torch

    st = load_sentence_transformer(source, device="cpu", attn_implementation="eager")
    st.eval()
    dimension, limit = st.get_embedding_dimension(), st.max_seq_length
    if not dimension or not limit:
        raise RouterModelError("the embedder does not report its embedding size and max_seq_length", path=source)
    sample = _features(st, list(PROBES[:2]))
    names = [k for k, v in sample.items() if isinstance(v, torch.Tensor)]
    constants = {k: v for k, v in sample.items() if not isinstance(v, torch.Tensor)}
    log.info("exporting embedder %s to ONNX (%s) in %s", model_id, backend, target)
    with atomic_dir(target, replace=True) as tmp:
        traced = tmp / "traced.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(_embedding_module(st, names, constants), tuple(sample[n] for n in names), str(traced),
                              dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=["sentence_embedding"],
                              dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names},
                                            "sentence_embedding": {0: "batch"}})
        fused = False
        if backend == "onnx-int8":
            # Quantised after fusion, the attention and embedding kernels drifted further from torch
            # (held-out macro-F1 0.896 vs 0.901 unfused, torch 0.906): int8 quantises the traced graph.
            _quantize(traced, tmp / MODEL_FILE)
        else:
            graph, fused = _fuse(traced, tmp, st)
            graph.rename(tmp / MODEL_FILE)
        for leftover in (traced, tmp / "fused.onnx"):
            leftover.unlink(missing_ok=True)
        st.tokenizer.save_pretrained(tmp)
        shutil.copy2(source / "config.json", tmp / "config.json")
        meta = {"format": EXPORT_FORMAT, "backend": backend,
                "source": {"id": model_id, "fingerprint": source_fingerprint},
                "dimension": int(dimension), "max_seq_length": int(limit), "inputs": names, "opset": OPSET,
                "fused": fused, "quantization": {"weights": "int8", "per_channel": True, "activations": "dynamic"}
                if backend == "onnx-int8" else None,
                "versions": _versions(ort, torch)}
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        meta["check"] = _check(OnnxEncoder(tmp), st, backend)
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("exported %s: %s", model_id, meta["check"])
    return target


def _features(st: Any, texts: list[str]) -> dict[str, Any]:
    """sentence-transformers' own tokenisation (``preprocess`` since 6.0, ``tokenize`` before)."""
    method = getattr(st, "preprocess", None) or st.tokenize
    return dict(method(texts))


def _embedding_module(st: Any, names: list[str], constants: dict[str, Any]) -> Any:
    """Positional tensors in, the model's pooled ``sentence_embedding`` out: the module the tracer sees."""
    import torch

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, *tensors: Any) -> Any:
            return self.st({**constants, **dict(zip(names, tensors, strict=True))})["sentence_embedding"]

    return Embed().eval()


def _fuse(traced: Path, tmp: Path, st: Any) -> tuple[Path, bool]:
    """ONNX Runtime's BERT fusions (attention, embedding + layer norm, skip layer norm, bias GELU) when they apply."""
    config = st[0].auto_model.config
    if getattr(config, "model_type", None) != "bert":
        log.info("no offline fusion for model type %r; ONNX Runtime's own graph optimisations still apply",
                 getattr(config, "model_type", None))
        return traced, False
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(traced), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=1)
    out = tmp / "fused.onnx"
    optimized.save_model_to_file(str(out))
    return out, True


def _quantize(graph: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weight scales keep the embeddings closest to float32 (measured: see the README).
    quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _check(encoder: OnnxEncoder, st: Any, backend: str) -> dict[str, Any]:
    """Refuse an export whose tokens or embeddings differ from the torch encoder's on the probe texts."""
    import torch

    texts = clip_texts(list(PROBES), encoder.max_seq_length)
    for text in texts:
        ours = encoder._tokenizer([text], truncation="longest_first", max_length=encoder.max_seq_length)["input_ids"]
        theirs = _features(st, [text])["input_ids"].tolist()
        if ours != theirs:
            raise RouterModelError(f"the exported tokenizer splits {text[:40]!r} unlike sentence-transformers")
    with torch.inference_mode():
        reference = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=1)
    ours_v = encoder.encode(texts, batch_size=1)
    cosine = float((ours_v * reference).sum(axis=1).min())
    result = {"probes": len(texts), "min_cosine_to_torch": round(cosine, 6),
              "max_abs_diff_to_torch": round(float(np.abs(ours_v - reference).max()), 6)}
    if cosine < MIN_COSINE[backend]:
        raise RouterModelError(f"the {backend} export drifts from the torch encoder ({result}); "
                               "use --encoder-backend torch")
    return result


def _versions(ort: Any, torch: Any) -> dict[str, str]:
    import onnx
    import sentence_transformers
    import transformers

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__}


def build_encoder(model: str | Path | None, backend: str) -> Any:
    """The encoder to fit a router with: the torch model itself, or its (cached) ONNX export."""
    from persona_router.router.encoder import load_encoder

    if check_backend(backend) == "torch":
        return load_encoder(model)
    return OnnxEncoder(ensure_export(model, backend))
