"""Runs inside vLLM's worker processes (named by `worker_extension_cls`): in-place weight reload.

Tensors nested in RPC arguments arrive as lists, so weights travel through shared-memory files the
worker maps once (engine.rollout.SharedBuckets); the RPC only names the file and the tensor slots. On
CPU the worker's `reload_weights` re-packs them into its kernel layouts (a raw `load_weights` would not).
"""
from __future__ import annotations

import time


class WeightSyncExtension:
    def trident_load_shared(self, path: str, layout: list) -> int:
        """Reload from a shared-memory bucket (engine.rollout.SharedBuckets): views, no copies."""
        import torch

        maps = self.__dict__.setdefault("_trident_maps", {})
        if path not in maps:
            size = max(start + nbytes for *_, start, nbytes in layout)
            maps[path] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        buf = maps[path]
        tensors = [(name, buf[start:start + nbytes].view(getattr(torch, dtype)).view(shape))
                   for name, dtype, shape, start, nbytes in layout]
        self.model_runner.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)

    def trident_reload_seconds(self, payload: bytes) -> float:
        """Time `reload_weights` alone (tensors deserialised first): the floor a weight sync compares to."""
        from safetensors.torch import load

        tensors = load(payload)
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return time.perf_counter() - t0
