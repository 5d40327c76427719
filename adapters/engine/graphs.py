"""CUDA graphs for the decode step (one capture per (rows, kv_len, slot bucket), replayed every step) and
for short prefills (``PrefillGraphs``).

A decode step of a 32-layer model launches hundreds of small kernels; at small batch the launch gaps,
not the GPU, set the pace. Replaying a captured graph removes them. Captures are lazy (the first step of
a new shape pays ~one extra forward pass), share one memory pool, and are bounded in number (LRU).
A capture that fails (an operation that cannot be captured) turns graphs off and the engine runs eagerly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from persona_router.adapters.engine.runner import ModelRunner

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, *, max_graphs: int = 64) -> None:
        import torch

        self.runner = runner
        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple[int, int, int], tuple[Any, Any]] = OrderedDict()
        self.disabled = False
        self.captures = 0

    def __call__(self, rows: int, kv_len: int, m: int) -> Any:
        if self.disabled:
            return self.runner.decode(rows, kv_len, m)
        key = (rows, kv_len, m)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key)
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed (%s); decoding without graphs from now on", exc)
                self.disabled = True
                self.graphs.clear()
                return self.runner.decode(rows, kv_len, m)
        else:
            self.graphs.move_to_end(key)
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, key: tuple[int, int, int]) -> tuple[Any, Any]:
        import torch

        rows, kv_len, m = key
        # Warm-up runs are the real step: they write the same keys and values the replay will write.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.runner.decode(rows, kv_len, m)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (the service's embedder, say) must not break the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.runner.decode(rows, kv_len, m)
        self.graphs[key] = (graph, logits)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        log.debug("captured decode graph rows=%d kv_len=%d slots=%d", rows, kv_len, m)
        return graph, logits


class PrefillGraphs:
    """CUDA graphs for short prefills: one capture per (prompts, padded length, slot bucket).

    A 128-token prefill launches over a thousand kernels, and eagerly the host's launch work (tens of
    milliseconds) rather than the GPU sets the time to first token. Prompts are right-padded to a power of
    two (at least 16) so few shapes exist; only prefills of at most ``max_tokens`` padded tokens are
    captured (``EngineConfig.prefill_graph_tokens``; longer ones run eagerly). The inputs live in static
    tensors per graph, filled by one copy each before the replay. A failed capture turns prefill graphs off;
    prefill then runs eagerly.
    """

    def __init__(self, runner: ModelRunner, pool: Any, *, max_tokens: int = 512, max_graphs: int = 32) -> None:
        self.runner = runner
        self.pool = pool
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple[int, int, int], tuple[Any, Any, Any]] = OrderedDict()
        self.disabled = False
        self.captures = 0

    def __call__(self, rows: list[int], prompts: list[list[int]], slots: list[int], m: int) -> Any:
        length = padded_length(max(len(p) for p in prompts))
        if self.disabled or len(rows) * length > self.max_tokens or length > self.runner.cache_len:
            return self.runner.prefill(rows, prompts, slots, m)
        inputs = self.runner.prefill_inputs(rows, prompts, slots, length)
        key = (len(rows), length, m)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                return self._capture(key, inputs)
            except RuntimeError as exc:
                log.warning("CUDA graph capture of prefill failed (%s); prefilling without graphs from now on", exc)
                self.disabled = True
                self.graphs.clear()
                return self.runner.prefill_forward(inputs, m)
        self.graphs.move_to_end(key)
        graph, static, logits = entry
        for name in ("tokens", "row_index", "slot_ids", "last"):
            getattr(static, name).copy_(getattr(inputs, name))
        graph.replay()
        return logits

    def _capture(self, key: tuple[int, int, int], inputs: Any) -> Any:
        import torch

        m = key[2]
        # Warm-up runs are the real prefill (same rows, same prompts): the replay writes the same cache entries.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.runner.prefill_forward(inputs, m)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self.runner.prefill_forward(inputs, m)
        self.graphs[key] = (graph, inputs, logits)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        log.debug("captured prefill graph prompts=%d length=%d slots=%d", *key)
        graph.replay()  # the captured run computed nothing yet: this one fills ``logits``
        return logits


def padded_length(longest: int) -> int:
    """A prompt length rounded up to a power of two, at least 16 (few distinct prefill shapes)."""
    length = 16
    while length < longest:
        length *= 2
    return length
