"""The process side of a separate rollout engine's ranks: they live outside the training world, so
they end themselves when the trainers fail or vanish (a launcher stops only its own node's ranks),
take the devices of their block, and say where other hosts reach them."""
from __future__ import annotations

import contextlib
import os
import time

import torch

ABORT_KEY = "trident/abort"


@contextlib.contextmanager
def abort_on_error(job, rank: int):
    """On a trainer's error, tell a separate engine's ranks (their watchdogs) that the run is over, and why."""
    try:
        yield
    except BaseException as err:
        if job is not None:
            try:
                job.store.set(ABORT_KEY, f"trainer rank {rank} failed: {type(err).__name__}: {err}"[:2000])
            except Exception:  # the store went down with whoever hosted it: the watchdogs see that too
                pass
        raise


def watch(store, rank: int, every_s: float = 2.0) -> None:
    """A separate engine's rank ends itself once the trainers abort or their store is gone, even if it
    is stuck inside vLLM: a launcher only stops the ranks of its own node, so nothing else would."""
    import sys
    import threading

    def loop():
        while True:
            time.sleep(every_s)
            try:
                if not store.check([ABORT_KEY]):
                    continue
                why = store.get(ABORT_KEY).decode()
            except Exception as err:
                why = f"lost the trainers' store ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
            print(f"rollout engine rank {rank}: the run ended: {why}", file=sys.stderr, flush=True)
            _kill_children()  # vLLM's engine and workers, which would outlive this process
            os._exit(1)

    threading.Thread(target=loop, name="trident-engine-watchdog", daemon=True).start()


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def yield_cpu_to_trainers(niceness: int = 19) -> bool:
    """Put this engine rank, the vLLM processes it starts, and its session where it leads one, at the
    lowest CPU priority. vLLM's engine and worker busy-poll for ~1 s after every request and are
    reniced for that (vllm_engine._renice_children), but a separate engine's spin still took half of
    a shared host's cores from the trainers (measured: the two-node demo on one 2-core box scored in
    1.08 s a step, 0.12 s with this). Two schedulers, so two knobs. Plain per-process nice, which
    children inherit, is what competes where the kernel has no autogroup or the process sits in a cpu
    cgroup; an engine rank never trains, so it is always safe (a Ray actor included). Linux's
    autogroup shares the CPU between sessions first and applies nice only within one, and torchrun
    starts every rank in a session of its own, so a session leader also sets its autogroup's nice;
    a rank inside another's session (spawned by a test harness, whose session holds the trainers)
    must not. Returns whether either was set."""
    lowered = False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(niceness, os.getpriority(os.PRIO_PROCESS, 0)))
        lowered = True
    except OSError:
        pass
    if os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup", "w") as f:  # Linux with CONFIG_SCHED_AUTOGROUP
                f.write(str(niceness))
            lowered = True
        except OSError:  # no autogroup, or the session is in the root group, whose weight is fixed
            pass
    return lowered


def use_engine_devices(tp_gen: int) -> None:
    """A separate engine's host on a GPU node drives the devices of its block of ranks."""
    if torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        first = int(os.environ.get("LOCAL_RANK", "0"))
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(tp_gen))


def host_address() -> str:
    """This host's address as the other hosts of the job reach it: the interface routing to MASTER_ADDR
    (127.0.0.1 when the job is on one host, or alone)."""
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master, 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
