"""Runs inside vLLM's worker processes (named by `worker_extension_cls`): in-place weight reload.

Tensors nested in RPC arguments arrive as lists, so weights travel as safetensors bytes; on CPU the
worker's `reload_weights` re-packs them into its kernel layouts (a raw `load_weights` would not).
"""
from __future__ import annotations

import time


class WeightSyncExtension:
    def trident_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

        tensors = load(payload)
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)

    def trident_reload_seconds(self, payload: bytes) -> float:
        """Time `reload_weights` alone (tensors deserialised first): the floor a weight sync compares to."""
        from safetensors.torch import load

        tensors = load(payload)
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return time.perf_counter() - t0
