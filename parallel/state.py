"""ParallelState: the (dp, pp, tp) grid of ranks and its process groups.

Rank order puts TP fastest, then PP, then DP (rank = (dp_rank * pp + pp_rank) * tp + tp_rank), so a TP
group is always a run of consecutive ranks: on a GPU node those share NVLink. One object, passed
explicitly; nothing here is global.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.errors import ConfigError


@dataclass
class ParallelState:
    """Where this process sits in the grid and the groups it talks to. Groups are None at size 1."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    embed_group: object = None
    """First and last pipeline stage of this (dp, tp) position: where tied embeddings live twice."""
    tp_dp_group: object = None
    """Every TP and DP rank of this pipeline stage (Megatron's amax reduction group: FP8 scales)."""
    _subgroups: dict = field(default_factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.pp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def tp_subgroup(self, members: tuple[int, ...]):
        """A group of some TP ranks (by tp_rank), e.g. those sharing a replicated KV head.

        Every rank must call this for every subgroup in the same order (new_group is collective),
        so callers enumerate all subgroups of the partition, not just their own.
        """
        key = tuple(members)
        if key not in self._subgroups:
            groups = {}
            for dp_rank in range(self.dp):
                for pp_rank in range(self.pp):
                    base = (dp_rank * self.pp + pp_rank) * self.tp
                    ranks = [base + m for m in key]
                    groups[base] = dist.new_group(ranks) if len(ranks) > 1 else None
            self._subgroups[key] = groups[(self.rank // self.tp) * self.tp]
        return self._subgroups[key]


def validate_sizes(world_size: int, tp: int, pp: int) -> int:
    """Return dp for this world, or raise a one-line ConfigError."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    return world_size // (tp * pp)


def tune_malloc() -> bool:
    """glibc: serve big blocks from the heap and never trim it, so the activations freed by one step are
    reused by the next instead of being unmapped and page-faulted (and zeroed) in again. CPU training
    only (a GPU host's big one-off host buffers should go back to the OS). False where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def freeze_heap() -> None:
    """Move every Python object alive now (models, modules, the rollout engine's front end) out of the
    garbage collector's reach, after a final collection. Full collections then scan only what runs
    create: with torch, transformers and vLLM loaded, each one otherwise walks millions of objects
    (measured 0.4-0.7 s apiece in the middle of PPO steps). Call once set-up is done."""
    import gc

    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Undo freeze_heap when the objects it froze are being torn down (they are collectable again)."""
    import gc

    gc.unfreeze()


def _local_device(backend: str | None) -> torch.device:
    """This rank's device (cuda:LOCAL_RANK unless gloo is asked for), with the CPU tuned for training."""
    device = torch.device("cpu")
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if device.type == "cpu" and local_ranks:
        # ranks sharing a CPU node split its cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if device.type == "cpu":
        tune_malloc()
    return device


def init_parallel(tp: int = 1, pp: int = 1, backend: str | None = None, timeout_s: float = 300) -> ParallelState:
    """Create the grid for this process; joins torch.distributed when launched by torchrun.

    Without a launcher (no WORLD_SIZE) this is a single-process state with no groups.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_sizes(world_size, tp, pp)
    device = _local_device(backend)
    if world_size == 1 and not dist.is_initialized():
        return ParallelState(device=device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return build_state(dist.get_rank(), tp, pp, dp, device)


@dataclass
class Job:
    """Where this process sits in a launch whose last ranks do not train (they host rollout engines):
    ranks [0, trainers) form the training world, every rank shares the launcher's store."""

    rank: int
    world: int
    trainers: int
    store: object = field(repr=False)


def init_job(tp: int, pp: int, spare: int, backend: str | None = None,
             timeout_s: float = 300) -> tuple[ParallelState | None, Job | None]:
    """init_parallel for a launch whose last `spare` ranks serve instead of training: those get no
    ParallelState (None) and torch.distributed's default world holds only the trainers, so nothing in
    training ever waits on them. Both get the Job (its store is how they meet). spare = 0 is
    init_parallel."""
    if spare == 0:
        return init_parallel(tp, pp, backend, timeout_s), None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainers = world_size - spare
    if trainers < 1:
        raise ConfigError(f"{world_size} ranks leave none to train beside {spare} for the rollout engines")
    dp = validate_sizes(trainers, tp, pp)
    store, rank, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    job = Job(rank, world_size, trainers, store)
    if rank >= trainers:
        return None, job
    device = _local_device(backend)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, store=dist.PrefixStore("trident/train", store), rank=rank,
                            world_size=trainers, timeout=datetime.timedelta(seconds=timeout_s))
    return build_state(rank, tp, pp, dp, device), job


def build_state(rank: int, tp: int, pp: int, dp: int, device: torch.device) -> ParallelState:
    """Create every group of the grid (collective: all ranks call new_group for all groups)."""
    state = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, device=device)

    def make(groups: list[list[int]]):
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine = (g, ranks)
        return mine

    tp_groups = [[(d * pp + p) * tp + t for t in range(tp)] for d in range(dp) for p in range(pp)]
    pp_groups = [[(d * pp + p) * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)]
    dp_groups = [[(d * pp + p) * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]
    state.tp_group, state.tp_ranks = make(tp_groups)
    state.pp_group, state.pp_ranks = make(pp_groups)
    state.dp_group, state.dp_ranks = make(dp_groups)
    tp_dp_groups = [[(d * pp + p) * tp + t for d in range(dp) for t in range(tp)] for p in range(pp)]
    state.tp_dp_group = make(tp_dp_groups)[0]
    if pp > 1:
        embed_groups = [[(d * pp) * tp + t, (d * pp + pp - 1) * tp + t] for d in range(dp) for t in range(tp)]
        found = make(embed_groups)
        state.embed_group = found[0] if found else None
    return state
