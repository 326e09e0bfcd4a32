"""Rollout generation behind one interface: prompts -> responses + per-token log-probs.

Backends:
  native  the engine's own TP sampler (engine/sampler.py) on the training weights: nothing to sync
          (engine/native_rollout.py, with the Rollout every backend returns).
  vllm    N vllm.LLM engines (engine/vllm_engine.py), on training ranks or on ranks of their own; after
          every actor update their weights are replaced in place by the slices' owners
          (parallel/reshard.py): through one shared-memory file of full HF-named tensors on one host,
          or over a transfer group per engine that its workers join.
Both honour temperature, top-p, top-k, max new tokens and stop at EOS, and return identical results
on every rank.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from engine.native_rollout import NativeRollout, Rollout
from engine.sampler import SamplingParams
from engine.engine_ranks import host_address, use_engine_devices, watch, yield_cpu_to_trainers
from engine.network_weights import NetworkWeights
from engine.vllm_engine import VLLMEngine, vllm_available  # noqa: F401 (public name)
from engine.vllm_worker import vllm_tp_shards
from engine.weights import adopt_parameters, local_pieces
from parallel import comm
from parallel.reshard import SharedTarget, WireSender


GENERATE, SYNC, STOP = 1, 2, 3


@dataclass
class Placement:
    """Where the engines live, in ranks of the control link (every process of the run that takes
    part in generation): engine e is hosted by `hosts[e]`; the trainers are link ranks [0, trainers)."""
    engines: int
    tp_gen: int
    trainers: int
    separate: bool

    @property
    def hosts(self) -> list[int]:
        if self.separate:  # a block of tp_gen ranks (devices) per engine, after the trainers
            return [self.trainers + e * self.tp_gen for e in range(self.engines)]
        return [e * (self.trainers // self.engines) for e in range(self.engines)]

    @property
    def size(self) -> int:
        return self.trainers + (self.engines * self.tp_gen if self.separate else 0)


class VLLMRollout(NetworkWeights):
    """`engines` vLLM engines of `tp_gen` workers, on training ranks (colocated) or on ranks of their
    own (separate: `job`, from parallel.state.init_job). Prompts are split across engines in whole
    groups; results come back as tensors over the control link. After every actor update the weights
    move by the owners' slices (no gathers): into one shared-memory file on a single host
    (transfer shm), or over a transfer group per engine that its vLLM workers join (transfer network)."""

    name = "vllm"

    def __init__(self, model, eos_id: int, max_model_len: int, tp_gen: int = 1, enforce_eager: bool = True,
                 cpu_reserve: int = 0, log_level: str = "warning", engines: int = 1, transfer: str = "auto",
                 job=None, bucket_mb: int = 16, timeout_s: float = 600, window_mb: int = 2048, ahead: bool = True):
        chunks = model if isinstance(model, list) else [model]
        state = chunks[0].state
        self.state, self.eos_id, self.timeout_s, self.bucket_bytes = state, eos_id, timeout_s, bucket_mb << 20
        self.window_bytes, self.ahead = window_mb << 20, ahead
        self.place = Placement(engines, tp_gen, state.world_size, job is not None)
        self.per, self.dp = state.tp * state.pp, state.dp
        self._init_common(job)
        self.transfer = _transfer_mode(transfer, self.place, self._group())
        hf_cfg = chunks[0].cfg.to_hf()
        hf_cfg["torch_dtype"] = str(chunks[0].dtype).removeprefix("torch.")
        self.hf_cfg = hf_cfg
        start = dict(hf_cfg=hf_cfg, max_model_len=max_model_len, tp_gen=tp_gen, enforce_eager=enforce_eager,
                     cpu_reserve=cpu_reserve, log_level=log_level)
        if self.transfer == "shm":
            group = self._group()
            self.target = SharedTarget(local_pieces(chunks), group, writer=state.dp_rank == 0)
            # the actor's parameters move into the file where they can (all at TP = 1): the optimizer
            # then updates vLLM's source in place and a sync copies only the rest
            self.adopted = adopt_parameters(self.target, chunks)
            self._pieces = local_pieces(chunks)
            self.target.write(self._pieces)
            if self.rank in self.place.hosts:
                self.engine = VLLMEngine(weights=self.target.tensors(), **start)
        else:
            self.sender = WireSender(local_pieces(chunks), self.bucket_bytes)
            # each engine worker is sent only the shard of each tensor that it reads
            self._needs = vllm_tp_shards(hf_cfg, tp_gen, [spec[0] for spec in self.sender.specs])
            self.store.set(f"trident/specs/{self.rank}", json.dumps(self.sender.specs))
            if job is not None and self.rank == 0:
                self.store.set("trident/engine_start", json.dumps({**start, "eos_id": eos_id, "per": self.per,
                                                                   "dp": self.dp, "bucket_bytes": self.bucket_bytes,
                                                                   "window_bytes": self.window_bytes,
                                                                   "ahead": self.ahead}))
            if self.rank in self.place.hosts:
                self.engine = self._start_host(start)
            self._wait_for_engines()
            self.sync(chunks)  # the engines started from dummy weights
        self.worker_frozen_objects = self.engine.worker_frozen_objects if self.engine else []

    @classmethod
    def engine_ranks(cls, job, engines: int, tp_gen: int, timeout_s: float = 600) -> "VLLMRollout":
        """The rollout on a rank of a separate engine (not a trainer): call `serve()` on it."""
        self = cls.__new__(cls)
        self.state, self.timeout_s, self.transfer = None, timeout_s, "network"
        self.place = Placement(engines, tp_gen, job.trainers, True)
        watch(job.store, job.rank)
        self._init_common(job)
        start = json.loads(self.store.get("trident/engine_start"))
        self.eos_id, self.per, self.dp = start.pop("eos_id"), start.pop("per"), start.pop("dp")
        self.bucket_bytes, self.window_bytes = start.pop("bucket_bytes"), start.pop("window_bytes")
        self.ahead = start.pop("ahead")
        self.hf_cfg = start["hf_cfg"]
        if self.rank in self.place.hosts:
            use_engine_devices(tp_gen)
            yield_cpu_to_trainers()
            self.engine = self._start_host(start)
        self.worker_frozen_objects = self.engine.worker_frozen_objects if self.engine else []
        return self

    def _init_common(self, job) -> None:
        self.link, self.store = self._control_link(job)
        self.rank = self.link.rank if self.link else 0
        self.engine = self.target = self._pool = None
        self.last_sync_bytes = self.last_engine_bytes = 0
        self.engine_seconds = 0.0
        self.pending = self.ready = self._made = None
        self._links: dict[int, comm.Link] = {}
        self._senders = None
        self._pushed: dict[int, object] = {}  # engine -> this rank's sends in flight (push)

    # ---- set-up ----------------------------------------------------------------------------------

    def _group(self):
        return None if self.state is None or self.state.world_size == 1 else _world_group()

    def _control_link(self, job):
        """The link every trainer and engine host shares, on the job's store (separate) or on one the
        first rank serves (colocated); (None, store) for a single process with one engine."""
        if job is not None:
            return comm.Link(job.store, "trident/control", job.rank, self.place.size, self.timeout_s), job.store
        group = self._group()
        where = None
        if self.state.rank == 0:
            store = comm.tcp_store(host_address(), 0, host=True, timeout_s=self.timeout_s)
            where = (host_address(), store.port)
        where = comm.broadcast_object(where, group)
        if self.state.rank != 0:
            store = comm.tcp_store(*where, host=False, timeout_s=self.timeout_s)
        link = comm.Link(store, "trident/control", self.state.rank, self.place.size, self.timeout_s) if group else None
        return link, store

    def _start_host(self, start: dict):
        """This rank hosts an engine reached over the network: its transfer group's store lives here."""
        e = self.place.hosts.index(self.rank)
        self._transfer_store = comm.tcp_store(host_address(), 0, host=True, timeout_s=self.timeout_s)
        self.store.set(f"trident/engine/{e}", json.dumps([host_address(), self._transfer_store.port]))
        engine = VLLMEngine(**start)
        self.store.set(f"trident/ready/{e}", "1")
        return engine

    def _wait_for_engines(self, start_timeout_s: float = 1800) -> None:
        """Starting an engine (loading vLLM, profiling, its KV cache) may take minutes, which no op
        timeout should count; past `start_timeout_s` the run ends naming the engines still missing."""
        import datetime

        keys = [f"trident/ready/{e}" for e in range(self.place.engines)]
        try:
            self.store.wait(keys, datetime.timedelta(seconds=max(start_timeout_s, self.timeout_s)))
        except Exception:
            missing = [e for e, k in enumerate(keys) if not self.store.check([k])]
            raise RuntimeError(f"rollout engine(s) {missing} did not start within {start_timeout_s:.0f} s") from None

    # ---- weights (the network path: engine/network_weights.py) ----------------------------------

    def sync(self, model) -> float:
        """Replace every engine's weights with the model's, in place; returns seconds spent. `model`
        must be the one given at construction (its parameters are what the pieces view)."""
        t0 = time.perf_counter()
        self._drain()
        self._command(SYNC)
        if self.transfer == "shm":
            self.last_sync_bytes = self.target.write(self._pieces)
            if self.engine is not None:
                self.engine.load_shared(self.target.path, self.target.layout)
        else:
            self._network_sync()
        self._acks()
        return time.perf_counter() - t0

    def _acks(self) -> None:
        """Each engine host confirms its weights (the bytes it took): a stalled or lost engine is named."""
        if self.link is None:
            return
        for e, host in enumerate(self.place.hosts):
            got = torch.tensor([self.last_engine_bytes if host == self.rank else 0], dtype=torch.int64)
            self._link_op(lambda got=got, host=host: self.link.broadcast(got, host), f"rollout engine {e}'s weight sync")

    # ---- generation ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        self._drain()
        self.post(prompts, params)
        return self._gather()

    def post(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Start generating (separate engines run while the trainers go on); `collect` gathers it."""
        self._command(GENERATE, prompts, params)
        self.pending = (prompts, params)
        if self.place.separate and self.rank < self.place.trainers:
            return  # the engine hosts generate; the results are taken in collect
        self._host_generate()

    def _host_generate(self) -> None:
        prompts, params = self.pending
        self._made = None
        if self.engine is not None:
            first, count = self._share(len(prompts), self.place.hosts.index(self.rank))
            self._made = (self.engine.generate(prompts[first:first + count], params, self.eos_id, first) if count
                          else ([], [], 0.0))

    def _share(self, n: int, e: int) -> tuple[int, int]:
        """Engine e's first prompt and count of n. A step's prompts split evenly (check_placement), in
        whole groups; a held-out set of any size gives the first n % engines engines one more."""
        base, extra = divmod(n, self.place.engines)
        return e * base + min(e, extra), base + (e < extra)

    def collect(self) -> Rollout:
        """The posted generation's results, on every rank."""
        if self.ready is not None:
            out, self.ready = self.ready, None
            return out
        return self._gather()

    def _gather(self) -> Rollout:
        """Each engine host broadcasts its share as tensors: tokens (-1 padded), log-probs, seconds."""
        prompts, params = self.pending
        if self.place.separate and self.rank < self.place.trainers:
            self._made = None
        width = params.max_new_tokens
        responses, logprobs, seconds = [], [], []
        for e, host in enumerate(self.place.hosts):
            mine = self.engine is not None and host == self.rank
            share = self._share(len(prompts), e)[1]
            made = Rollout(*self._made[:2]) if mine else Rollout([[]] * share, [[]] * share)
            part = made.to_tensors(width)
            took = torch.tensor([self._made[2] if mine else 0.0], dtype=torch.float64)
            if self.link is not None:
                for t in (part["tokens"], part["logprobs"], took):
                    self._link_op(lambda t=t: self.link.broadcast(t, host), f"results of rollout engine {e}")
            part = Rollout.from_tensors(part["tokens"], part["logprobs"])
            responses += part.responses
            logprobs += part.logprobs
            seconds.append(float(took))
        self.pending = self._made = None
        self.engine_seconds = max(seconds)
        return Rollout(responses, logprobs)

    def _drain(self) -> None:
        """Take a posted generation's results before the engines are used again."""
        if self.pending is not None:
            self.ready = self._gather()

    def in_flight(self) -> Rollout | None:
        """The posted batch, gathered now (collective) and kept for `collect`: what a checkpoint saves."""
        self._drain()
        return self.ready

    def hold(self, batch: Rollout, engine_seconds: float) -> None:
        """Take a batch generated before a resume as the posted one, for the next `collect`."""
        self.ready, self.engine_seconds = batch, engine_seconds

    # ---- the control link ------------------------------------------------------------------------

    def _command(self, cmd: int, prompts=None, params=None) -> None:
        """Separate engines learn what to do next from the first trainer: a header, and for GENERATE
        the sampling parameters and the prompts (padded with -1)."""
        if not self.place.separate:
            return
        header = torch.zeros(8, dtype=torch.int64)
        floats = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0:
            header[0] = cmd
            if cmd == GENERATE:
                header[1:7] = torch.tensor([len(prompts), max(map(len, prompts)), params.max_new_tokens,
                                            -1 if params.seed is None else params.seed, params.top_k or 0,
                                            int(params.stop_at_eos)])
                floats[:] = torch.tensor([params.temperature, params.top_p])
        self._link_op(lambda: self.link.broadcast(header, 0), "a command to the rollout engines")
        if header[0] == GENERATE:
            self.link.broadcast(floats, 0)
            n, width = int(header[1]), int(header[2])
            ids = torch.full((n, width), -1, dtype=torch.int64)
            if self.rank == 0:
                for i, p in enumerate(prompts):
                    ids[i, :len(p)] = torch.tensor(p)
            self.link.broadcast(ids, 0)
            self._received = ([row[:k] for row, k in zip(ids.tolist(), (ids >= 0).sum(1).tolist())],
                              SamplingParams(float(floats[0]), float(floats[1]), int(header[5]), int(header[3]),
                                             bool(header[6]), None if header[4] < 0 else int(header[4])))
        self._last_command = int(header[0])

    def serve(self) -> None:
        """The loop of a separate engine's ranks: follow the first trainer's commands until STOP."""
        from engine.faults import crash_point, stall_point

        done = {SYNC: 0, GENERATE: 0}
        while True:
            self._command(0)
            if self._last_command == STOP:
                return
            done[self._last_command] += 1
            point = f"engine:{'sync' if self._last_command == SYNC else 'generate'}:{done[self._last_command]}"
            crash_point(point)
            stall_point(point)
            if self._last_command == SYNC:
                self._network_sync()
                self._acks()
            elif self._last_command == GENERATE:
                self.pending = self._received
                self._host_generate()
                self._gather()

    def _link_op(self, op, what: str):
        try:
            return op()
        except RuntimeError as err:
            raise RuntimeError(f"lost {what} (rank {self.rank} of the rollout link, timeout {self.timeout_s:.0f} s): "
                               f"{str(err).splitlines()[0]}") from None

    def close(self) -> None:
        if self.place.separate and self.rank == 0:
            self._drain()
            self._command(STOP)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self._pool is not None:
            self._pool.shutdown()
        if self.target is not None:
            self.target.close()


def _transfer_mode(transfer: str, place: Placement, group) -> str:
    """shm needs every trainer and engine on one host; auto picks it there, the network elsewhere."""
    import socket

    one_host = not place.separate and len(set(comm.all_gather_object(socket.gethostname(), group))) == 1
    if transfer == "auto":
        return "shm" if one_host else "network"
    if transfer == "shm" and not one_host:
        from engine.errors import ConfigError
        raise ConfigError("rollout.transfer=shm needs colocated engines and every rank on one host; use network")
    return transfer

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
