"""`trident bench checkpoint`: what a training-state checkpoint costs: save time (synchronous, and
asynchronous: how long training is blocked and how long the write takes in the background), load
time, and size on disk, for a named model size at DP ranks with or without ZeRO-1."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_rank(rank: int, world: int, size_name: str, precision: str, distributed: bool, out: str) -> dict:
    from engine import train_state
    from parallel import comm
    from tools.bench_memory import trained_handle
    from tools.bench_train import SIZES

    handle, _, _ = trained_handle(rank, world, SIZES[size_name].model_config(), precision=precision,
                                  distributed=distributed)
    state = handle.state
    root, models, res = Path(out), {"model": handle}, {"params": sum(p.numel() for p in handle.params)}
    for mode in ("sync", "async"):
        comm.barrier()
        t0 = time.perf_counter()
        pending = train_state.save(root / mode, 1, models, state, {"step": 1}, 1, async_save=mode == "async")
        blocked = time.perf_counter() - t0
        pending.finalize() if mode == "async" else None
        comm.barrier()
        res[f"{mode}_blocked_s"], res[f"{mode}_total_s"] = blocked, time.perf_counter() - t0
    comm.barrier()
    t0 = time.perf_counter()
    train_state.load(train_state.find(root / "sync"), models, state, log=lambda _: None)
    comm.barrier()
    res["load_s"] = time.perf_counter() - t0
    if rank == 0:
        res["bytes"] = _dir_bytes(root / "sync" / train_state.step_name(1))
        res["bytes_per_param"] = res["bytes"] / res["params"]
    return res


def run(size: str = "M", dp: int = 1, precision: str = "bf16", distributed: bool = False,
        out: str = "runs/bench_checkpoint") -> dict:
    from parallel.launch import run_ranks

    shutil.rmtree(out, ignore_errors=True)
    try:
        r = run_ranks(dp, measure_rank, size, precision, distributed, out)[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"size": size, "dp": dp, "precision": precision, "zero": distributed,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}


def report(res: dict) -> list[str]:
    return [f"checkpoint of size {res['size']} ({res['params'] / 1e6:.1f} M params, {res['precision']}, DP{res['dp']}"
            f"{', ZeRO-1' if res['zero'] else ''}): {res['bytes'] / 1024 ** 2:.0f} MiB "
            f"({res['bytes_per_param']:.1f} B/param)",
            f"  save sync  : {res['sync_total_s']:.2f} s (training blocked all of it)",
            f"  save async : training blocked {res['async_blocked_s']:.2f} s, written in {res['async_total_s']:.2f} s",
            f"  load       : {res['load_s']:.2f} s"]
