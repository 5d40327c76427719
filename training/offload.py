"""The checkpointed inputs of the first decoder layers kept in host memory (``offload_layers``).

Why: with reentrant gradient checkpointing a decoder layer keeps only its input for the backward (one
``tokens x hidden`` tensor: 12 MiB for 2,048 tokens of Phi-3-mini in bf16), and the step's memory peaks in the
backward of the last layer, while the inputs of every earlier layer are still waiting for their turn. The first
layers' inputs are the last to be needed, so they can wait in pinned host memory: each one moved out costs one
copy each way over PCIe (about 0.25 ms per 12 MiB on the H200's host link, queued behind the layer's own
kernels) and lowers that peak by its size. TRL's ``activation_offloading`` moves every saved activation of the
whole forward; this moves the few that set the peak and leaves the rest where the next kernels need them.

How: transformers calls each layer's ``_gradient_checkpointing_func(function, hidden_states, ...)``, set per
layer when the trainer enables checkpointing (after this module runs, so the function is wrapped lazily, at
each forward of the decoder stack, if it is not wrapped yet). The wrapper runs the checkpoint under saved-tensor
hooks that pack the layer's ``hidden_states`` input, and nothing else, into a pinned host tensor and unpack it
onto its device when the backward reaches that layer. Both copies are queued on the current stream
(non-blocking), so they are ordered with the kernels around them and the host does not wait; the caching
allocators keep both buffers until the copies are done. Only reentrant checkpointing saves the input through
autograd; the non-reentrant kind keeps it in a Python closure, which the hooks never see, so that pairing is
refused (``training/config.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)


class OffloadedCheckpoint:
    """A layer's checkpoint function whose saved ``hidden_states`` input waits in host memory."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.bytes_offloaded = 0  # over the life of the run: what the pack hook moved to the host

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import torch

        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or not torch.is_grad_enabled():
            return self.inner(function, *args, **kwargs)
        # Identify the input by address and shape, not by reference: the hooks outlive this call, and a reference
        # would keep the very tensor alive that they move out.
        key = (hidden.data_ptr(), tuple(hidden.shape), hidden.dtype)
        with torch.autograd.graph.saved_tensors_hooks(self._packer(key), _unpack):
            return self.inner(function, *args, **kwargs)

    def _packer(self, key: tuple[int, tuple[int, ...], Any]) -> Callable[[Any], Any]:
        def pack(tensor: Any) -> Any:
            import torch

            if (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) != key:
                return tensor
            pinned = tensor.is_cuda and torch.cuda.is_available()
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            host.copy_(tensor, non_blocking=pinned)
            self.bytes_offloaded += tensor.numel() * tensor.element_size()
            return _Offloaded(tensor.device, host)

        return pack


class _Offloaded:
    __slots__ = ("device", "host")

    def __init__(self, device: Any, host: Any) -> None:
        self.device = device
        self.host = host


def _unpack(packed: Any) -> Any:
    if isinstance(packed, _Offloaded):
        return packed.host.to(packed.device, non_blocking=packed.host.is_pinned())
    return packed


@dataclass
class OffloadedLayers:
    """What :func:`offload_first_layers` set up: ``count`` layers, and their wrappers (filled in at the first
    forward; ``bytes_offloaded`` says what moved)."""

    count: int
    wrappers: list[OffloadedCheckpoint] = field(default_factory=list)


def offload_first_layers(model: Any, count: int) -> OffloadedLayers:
    """Keep the checkpointed inputs of ``model``'s first ``count`` decoder layers (at most all but the last) in
    host memory."""
    if count < 1:
        raise ConfigError(f"{count!r} must be an integer >= 1", field="offload_layers")
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if count >= len(layers):
        # The last layer's input is the first the backward needs: moving it out would only add two copies.
        log.warning("offload_layers=%d on a model of %d decoder layers: moving the first %d", count, len(layers),
                    max(len(layers) - 1, 0))
        count = len(layers) - 1
    if count < 1:
        return OffloadedLayers(0)
    stack = _decoder_stack(model, layers[0])
    chosen: list[Any] = layers[:count]
    result = OffloadedLayers(count)
    wrappers = result.wrappers

    def wrap_checkpoint_functions(_module: Any, _args: Any) -> None:
        for index, layer in enumerate(chosen):
            current = getattr(layer, "_gradient_checkpointing_func", None)
            if current is None or isinstance(current, OffloadedCheckpoint):
                continue
            wrapper = OffloadedCheckpoint(current)
            layer._gradient_checkpointing_func = wrapper
            if index < len(wrappers):  # checkpointing enabled again: keep counting on the new wrapper
                wrapper.bytes_offloaded = wrappers[index].bytes_offloaded
                wrappers[index] = wrapper
            else:
                wrappers.append(wrapper)

    stack.register_forward_pre_hook(wrap_checkpoint_functions)
    log.info("checkpointed inputs of the first %d of %d decoder layers go to host memory", count, len(layers))
    return result


def _decoder_stack(model: Any, first_layer: Any) -> Any:
    """The module whose forward calls the decoder layers (the one holding them in a ModuleList)."""
    import torch

    for module in model.modules():
        for child in module.children():
            if isinstance(child, torch.nn.ModuleList) and any(layer is first_layer for layer in child):
                return module
    raise ConfigError(f"cannot find the decoder layers' parent in {type(model).__name__}", field="offload_layers")
