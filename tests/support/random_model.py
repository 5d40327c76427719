"""Randomly initialised models of a given shape, saved as normal model folders.

Unit tests use a tiny Phi-3 (two layers) with a tokenizer trained on the spot; GPU benchmarks use
Phi-3-mini's exact shape (``Phi3Config()`` defaults, 3.82B parameters) because no Phi-3 weights can reach
the benchmark machine. Speed and memory depend on the shape, not the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. why is the sky blue? light scatters in air. "
    "a student asks a question and a teacher answers it. the heart pumps blood. code runs fast. "
    "system user assistant context question answer explain simply clinical dose lesson objective. "
)


def train_tiny_tokenizer(folder: Path, *, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=2048)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def tiny_phi3_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import Phi3Config

    settings: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        "original_max_position_embeddings": 2048, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    return Phi3Config(**settings)


def save_random_model(folder: Path, config: Any, *, seed: int = 0, dtype: Any = None, device: Any = None) -> Any:
    """Initialise ``config``'s architecture with a fixed seed and save it (weights + config).

    ``device="cuda"`` draws the random weights on the GPU: minutes faster for a 3.8B model than the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.eval()
    model.save_pretrained(folder)
    return model


def build_tiny_model(folder: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A complete tiny Phi-3 model folder (config, weights, tokenizer with chat template)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(folder)
    save_random_model(folder, tiny_phi3_config(len(tokenizer), **overrides), seed=seed)
    return folder
