"""Rollout generation behind one interface: prompts -> responses + per-token log-probs.

Backends:
  native  the engine's own TP sampler (engine/sampler.py) on the training weights: nothing to sync.
  vllm    one vllm.LLM per run on the first rank; after every actor update its weights are replaced
          in place (full HF-named tensors streamed in buckets -> worker `reload_weights`).
Both honour temperature, top-p, top-k, max new tokens and stop at EOS, and return identical results
on every rank.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.sampler import SamplingParams, generate
from engine.weights import iter_full_tensors
from parallel import comm


@dataclass
class Rollout:
    responses: list[list[int]]
    logprobs: list[list[float]]
    """Log-prob of each sampled token under softmax(logits / temperature) of the generating weights."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:  # vllm absent, or installed with a broken CUDA-only dependency
        return False


class NativeRollout:
    name = "native"

    def __init__(self, model, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id

    def sync(self, model) -> float:
        return 0.0  # generates from the training weights themselves

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        return Rollout(*generate(self.model, prompts, params, self.eos_id, self.pad_id))

    def close(self) -> None:
        pass


class VLLMRollout:
    """vLLM on the first rank of the run; other ranks take part in weight gathering and receive results."""

    name = "vllm"

    def __init__(self, model, eos_id: int, max_model_len: int, tp_gen: int = 1, bucket_mb: int = 256,
                 enforce_eager: bool = True):
        self.state, self.eos_id = model.state, eos_id
        self.bucket_bytes = bucket_mb * 1024**2
        self.is_driver = self.state.rank == 0
        self.llm = None
        self.last_sync_bytes = 0
        self._dir = tempfile.mkdtemp(prefix="trident-vllm-") if self.is_driver else None
        self._shm = SharedBuckets() if self.is_driver else None
        # vLLM starts from a directory: write the current actor there once (later syncs go in place)
        tensors = {}
        for bucket in iter_full_tensors(model, self.bucket_bytes):
            tensors.update(bucket)
        if self.is_driver:
            save_file(tensors, os.path.join(self._dir, "model.safetensors"), metadata={"format": "pt"})
            hf_cfg = model.cfg.to_hf()
            hf_cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
            Path(self._dir, "config.json").write_text(json.dumps(hf_cfg))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            if tp_gen > 1:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1))
                                                                             for i in range(tp_gen)))
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            from vllm import LLM
            self.llm = LLM(model=self._dir, skip_tokenizer_init=True, enforce_eager=enforce_eager,
                           dtype=hf_cfg["torch_dtype"], tensor_parallel_size=tp_gen, max_model_len=max_model_len,
                           worker_extension_cls="engine.vllm_worker.WeightSyncExtension", seed=0)
            _renice_children()
        del tensors

    def sync(self, model) -> float:
        """Replace vLLM's weights with the model's, in place; returns seconds spent."""
        t0 = time.perf_counter()
        self.last_sync_bytes = 0
        for i, bucket in enumerate(iter_full_tensors(model, self.bucket_bytes)):
            path, layout = self._shm.put(i, bucket)
            self.last_sync_bytes += sum(n for *_, n in layout)
            self.llm.collective_rpc("trident_load_shared", args=(path, layout))
        comm.barrier()
        return time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        result = None
        if self.is_driver:
            from vllm import SamplingParams as VP
            # one seed per request: repeated prompts (a group of samples) must not draw identical samples
            vps = [VP(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                      max_tokens=params.max_new_tokens, logprobs=0,
                      seed=None if params.seed is None else params.seed + i,
                      stop_token_ids=[self.eos_id] if params.stop_at_eos else None,
                      ignore_eos=not params.stop_at_eos) for i in range(len(prompts))]
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vps, use_tqdm=False)
            responses, logprobs = [], []
            for o in outs:
                c = o.outputs[0]
                responses.append(list(c.token_ids))
                logprobs.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            result = Rollout(responses, logprobs)
        group = None if self.state.world_size == 1 else _world_group()
        return comm.broadcast_object(result, group)

    def close(self) -> None:
        if self.llm is not None:
            del self.llm
            self.llm = None
        if self._shm is not None:
            self._shm.close()


class SharedBuckets:
    """Weight buckets in shared-memory files that the vLLM workers map once: a sync is one copy of each
    tensor into its slot plus a small RPC naming the file and the slots (no serialisation, no pipe)."""

    ALIGN = 64

    def __init__(self):
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="trident-weights-", dir=root)
        self.files: dict[int, tuple[str, list, torch.Tensor]] = {}

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> tuple[str, list]:
        layout, offset = [], 0
        for name, t in tensors.items():
            layout.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, t.numel() * t.element_size()))
            offset += -(-layout[-1][-1] // self.ALIGN) * self.ALIGN
        path, old_layout, buf = self.files.get(index, (None, None, None))
        if old_layout != layout:  # first sync, or a bucket of other tensors: a new file
            path = os.path.join(self.dir, f"bucket{index}-{len(self.files)}.bin")
            buf = torch.from_file(path, shared=True, size=max(offset, 1), dtype=torch.uint8)
            self.files[index] = (path, layout, buf)
        for (name, _, _, start, nbytes), t in zip(layout, tensors.values()):
            buf[start:start + nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))
        return path, layout

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def _renice_children(niceness: int = 19) -> None:
    """vLLM's engine and worker processes busy-poll their queues for ~1 s after every request; when
    they share cores with training (CPU, or a small node) that spin steals the trainer's time. At the
    lowest priority they still get every idle cycle, and generation runs while the trainer waits."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.nice(niceness)
        except (psutil.Error, OSError):
            pass


def _world_group():
    import torch.distributed as dist
    return dist.group.WORLD


def make_rollout(backend: str, model, eos_id: int, pad_id: int, max_model_len: int, **vllm_kwargs):
    if backend == "auto":
        backend = "vllm" if vllm_available() else "native"
    if backend == "native":
        return NativeRollout(model, eos_id, pad_id)
    if backend == "vllm":
        return VLLMRollout(model, eos_id, max_model_len, **vllm_kwargs)
    from engine.errors import ConfigError
    raise ConfigError(f"unknown rollout backend {backend!r} (auto, vllm, native)")
