"""Engine settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from persona_router.core.errors import ConfigError, choices

NF4_MODES: tuple[str, ...] = ("auto", "fused", "dequantize", "kernel")
SWITCHES: tuple[str, ...] = ("auto", "on", "off")
GEMVS: tuple[str, ...] = ("bitsandbytes", "triton", "kmajor", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    """How big the engine's static buffers are and how it runs.

    ``max_batch`` sequences run at once, each with a KV cache of ``max_len`` tokens (prompt plus answer).
    ``max_adapters`` LoRA adapters are resident at once, each of rank at most ``max_rank``. ``max_queue``
    requests may wait for a free sequence slot before ``submit`` raises ``QueueFullError``.

    ``nf4_mode`` applies to a base loaded in 4-bit: ``fused`` (CUDA, Triton) reads the 4-bit weights inside
    the engine's own kernels: for a 16-bit model on compute capability 8.0+ one K-major copy made at load
    serves every row count (``nf4_gemv`` for one row, ``nf4_mma`` beyond, decoding one weight at a time for
    cuBLAS from 9 rows), elsewhere bitsandbytes' own bytes (``nf4_kernels``); no bf16 copy of the model.
    ``dequantize`` unpacks each NF4 weight once to the activations' dtype (the values bitsandbytes computes
    with, 4x the memory, plain matrix products); ``kernel`` keeps the 4-bit weights and calls the bitsandbytes
    module itself (the same call PEFT makes, so the reference on a CPU float32 model). ``auto`` is
    ``dequantize`` on CUDA, ``kernel`` on CPU: on an H200 ``fused`` peaked 6.9 GiB lower (Phi-3-mini's shape)
    but ``dequantize`` served 1.2-1.5x its tokens/s from 8 streams up (see the README's GPU serving section), so
    ``fused`` is opt-in.
    ``cuda_graphs`` captures the decode step per batch shape on CUDA. ``fuse`` folds the residual add and
    the LoRA update into ``addmm`` calls and ``compile`` fuses the pointwise pieces with ``torch.compile``:
    fewer kernels, the same function up to rounding order. Each switch's ``auto`` means on for CUDA, off on
    CPU (where the unfused path reproduces Hugging Face + PEFT float32 outputs exactly).

    ``kernels`` switches the CUDA step to the engine's Triton kernels where they measured faster: decode
    attention that applies the rotary embedding, writes the step's key and value and reads only each row's
    live cache length; for steps of at most ``lora_kernel_rows`` rows a LoRA shrink that gathers each
    row's adapter by slot and also computes the projection's input (the layer norm, the gated activation: two
    kernels fewer), with an expand that adds the residual; for one row in ``dequantize`` mode, a 4-bit GEMV on
    the NF4 bytes instead of cuBLAS on the bf16 copy (``gemv``). Wider steps keep the bank's LoRA products
    and cuBLAS. ``auto`` (the default) is on for CUDA with a half-precision model and Triton installed (float32
    keeps the exact torch path), off on CPU: on an H200 it measured faster than the torch path in every serving
    case of the same run (see the README's GPU serving section).

    ``gemv`` picks the one-row 4-bit product of ``kernels`` in ``dequantize`` mode: ``bitsandbytes`` (its own
    GEMV), ``triton`` (the engine's row-major ``nf4_kernels.nf4_gemv`` with the code table in registers,
    ``nf4_lut``) or ``kmajor`` (the default; ``nf4_gemv``: a K-major copy of each 4-bit weight, made at load,
    read by the engine's own GEMV; half a byte per weight more memory, 1.8 GB for Phi-3-mini; on an H200
    1.5-1.9x faster per projection than bitsandbytes' GEMV, see the README's GPU serving section) or ``cuda``
    (the same copy read by a CUDA C++ kernel compiled at start with NVRTC, ``nf4_gemv_cuda``; also the one-row
    kernel of ``nf4_mode="fused"``). The engine's GEMVs add the residual and the LoRA update in their epilogue,
    so the expand is no separate kernel.

    ``dense_gemv``: with ``kernels``, one-row products on a dense 16-bit weight (a bf16 or fp16 base, groups
    without a 4-bit copy) run the CUDA C++ GEMV ``dense_gemv_cuda`` (compiled at start with NVRTC; LoRA and
    residual in its epilogue) instead of cuBLAS and the expand kernel. ``auto`` (the default) is on where NVRTC is
    found: on an H200 (Phi-3-mini's shape, bf16, one serving run,
    ``benchmarks/results/serve_gpu_dense_gemv_default_h200.json``) batch-1 decoding took 2.86 against 3.59
    ms/token with it off, the streams within 2%.

    ``lora_kernel_rows``: with ``kernels``, steps of up to this many rows run the LoRA update as Triton kernels;
    wider steps use the bank's two products over the resident slots (one-hot masks); 0 keeps every step on the
    bank's products. Up to ``lora_kernels.GATHER_ROWS`` rows each row gathers its own adapter; above, the kernels
    are the tensor-core shrink over the step's slots (which also computes the norm or the gated activation) and
    one product over their stacked ``Bt`` (``lora_kernels._expand_dense``). The default, 64, covers every decode step
    up to 64 rows; prefills of more tokens keep the bank's products (not measured on the kernels). On an H200
    (Phi-3-mini's shape, NF4, one serving run, ``benchmarks/results/serve_gpu_lora_rows_prefill_h200.json``) it
    served 64 streams over 4 adapters at 7,028 tok/s against 6,041 with 8, once the shrink's tiles were narrowed
    (16 x 16 then; ``lora_kernels.tiling_for`` now gives 16 x 32); with the first tiling it had served fewer
    tokens/s than 8.

    ``prefill_graph_tokens``: with ``cuda_graphs``, prefills of at most this many tokens (prompts times their
    padded length) replay a CUDA graph, one capture per (prompts, padded length, slot bucket), each about three
    eager prefills' time the first time it is seen; longer ones run eagerly. An eager prefill's launches take
    tens of milliseconds of host time (76 ms for one 128-token prompt of Phi-3-mini's shape on an H200, for
    5.8 ms of kernels). In the run above the default, 4096, brought 8 prompts' first token from 48-57 ms to
    25 ms against 512; 32 prompts (4,096 tokens) took about 80 ms either way, their kernels' time.

    ``kv_block`` rounds the attended cache length up (fewer graph shapes; at most that many masked positions).
    ``stop_token_ids`` end every request in addition to its own; ``None`` takes the tokenizer's and the
    generation config's end-of-sequence ids (what ``generate`` stops on).
    """

    max_batch: int = 16
    max_len: int = 2048
    max_queue: int = 256
    max_adapters: int = 8
    max_rank: int = 16
    max_prefill_tokens: int = 4096
    nf4_mode: str = "auto"
    cuda_graphs: str = "auto"
    fuse: str = "auto"
    compile: str = "auto"
    kernels: str = "auto"
    gemv: str = "kmajor"
    dense_gemv: str = "auto"
    lora_kernel_rows: int = 64
    prefill_graph_tokens: int = 4096
    kv_block: int = 256
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self.max_batch, "max_batch", upper=1024)
        _positive(self.max_len, "max_len", upper=1 << 20)
        _positive(self.max_queue, "max_queue", upper=1 << 20)
        _positive(self.max_adapters, "max_adapters", upper=1024)
        _positive(self.max_rank, "max_rank", upper=1024)
        _positive(self.kv_block, "kv_block", upper=1 << 20)
        _between(self.lora_kernel_rows, "lora_kernel_rows", 0, 1 << 20)
        _between(self.prefill_graph_tokens, "prefill_graph_tokens", 0, 1 << 20)
        if self.max_prefill_tokens < 1:
            raise ConfigError(f"{self.max_prefill_tokens} must be at least 1", field="max_prefill_tokens")
        if self.nf4_mode not in NF4_MODES:
            raise ConfigError(f"{self.nf4_mode!r} is not one of {choices(NF4_MODES)}", field="nf4_mode")
        if self.gemv not in GEMVS:
            raise ConfigError(f"{self.gemv!r} is not one of {choices(GEMVS)}", field="gemv")
        for name in ("cuda_graphs", "fuse", "compile", "kernels", "dense_gemv"):
            value = getattr(self, name)
            if value not in SWITCHES:
                raise ConfigError(f"{value!r} is not one of {choices(SWITCHES)}", field=name)
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise ConfigError("token ids must be non-negative", field="stop_token_ids")


def _positive(value: int, name: str, *, upper: int) -> None:
    _between(value, name, 1, upper)


def _between(value: int, name: str, lower: int, upper: int) -> None:
    if not lower <= value <= upper:
        raise ConfigError(f"{value} must be between {lower} and {upper}", field=name)
