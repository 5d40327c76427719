"""CUDA graphs for the decode step: one capture per (rows, kv_len, slot bucket), replayed every step.

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
