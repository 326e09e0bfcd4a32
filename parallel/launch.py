"""Start N local gloo ranks (CPU processes on a free port) and collect each rank's return value.

Used by tests and by commands such as `trident check-hf --tp 2` when they are not already running
under torchrun. `fn(rank, world, *args)` must be importable (module level).
"""
from __future__ import annotations

import os
import pickle
import queue as queue_lib
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """Ranks fork from a server process that imported torch once, instead of each starting a fresh
    interpreter (spawn) and importing torch itself: ~1.7 s of CPU a rank, which on a small node is
    most of a short multi-rank run. The server never runs an op, so no OpenMP pool is forked; it
    lives as long as this process (started on the first call)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])
    return ctx


def _worker(rank, world, port, threads, fn, args, queue, env):
    # a forked rank inherits the server's environment, not this process's current one (its directory,
    # sys.path and __main__ come over as a spawned rank's do)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        # Plain pickle bytes: a queue would pass tensors as shared-memory handles that vanish when
        # this process exits before the parent has opened them.
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException as e:  # report to the parent instead of hanging the other ranks
        queue.put((rank, False, (e, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    def __init__(self, rank: int, error: BaseException, tb: str):
        super().__init__(f"rank {rank} failed:\n{tb}")
        self.rank, self.error = rank, error


def run_ranks(world: int, fn, *args, timeout: float = 600, threads: int = 1) -> list:
    """Run fn on `world` ranks; returns [result of rank 0, rank 1, ...]; raises RankFailed."""
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, threads, fn, args, q, dict(os.environ)))
             for r in range(world)]
    for p in procs:
        p.start()
    results, failure = {}, None
    try:
        while len(results) < world and failure is None:
            try:
                rank, ok, value = q.get(timeout=timeout)
            except queue_lib.Empty:
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s") from None
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failure = RankFailed(rank, *value)
    finally:
        for p in procs:
            p.join(timeout=2 if failure else 30)
            if p.is_alive():
                p.kill()
    if failure:
        raise failure
    return [results[r] for r in range(world)]
