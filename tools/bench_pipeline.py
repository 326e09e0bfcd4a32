"""`trident bench pipeline`: pipeline schedules on real processes, stages whose compute is a sleep.

Every stage costs a fixed forward and backward time per micro-batch (time.sleep, so 2 cores are not
the limit: what is measured is the schedule and its communication). Per schedule we report the step
time, the measured bubble fraction 1 - (ideal busy time) / (step time), its theory, and the step time
of the same action orders simulated with free communication (exact for unequal forward/backward):

  1f1b          (p-1) / (m+p-1)
  interleaved   bubble time (p-1) t / v (v model chunks per rank): (p-1)/v / (m + (p-1)/v)
  shared        actor and critic micro-batches in one 1F1B stream: (2m+p-1) t against
                2 (m+p-1) t for the actor's schedule followed by the critic's
"""
from __future__ import annotations

import statistics
import time

import torch

from parallel.launch import run_ranks
from parallel.pipeline import PipelineJob, build_order, one_f_one_b, run_pipeline
from parallel.state import build_state


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.bwd_s)
        return grad, None, None


class SleepStage(torch.nn.Module):
    def __init__(self, fwd_s: float, bwd_s: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.fwd_s, self.bwd_s, self.input = fwd_s, bwd_s, None

    def set_input_tensor(self, x):
        self.input = x

    def forward(self, x):
        x = self.input if self.input is not None else x
        return _Sleep.apply(x * self.w, self.fwd_s, self.bwd_s)


def _step(stage, mb):
    out = stage(mb)
    return out, lambda o: (o.sum() * 0.0, {})


def _worker(rank, world, m, fwd_s, bwd_s, v, steps):
    state = build_state(rank, 1, world, 1, torch.device("cpu"))
    shape = lambda mb: (4, 4)  # noqa: E731
    mbs = [torch.ones(4, 4) for _ in range(m)]

    def jobs(n_models, chunks):
        return [PipelineJob([SleepStage(fwd_s / chunks, bwd_s / chunks) for _ in range(chunks)], _step, mbs)
                for _ in range(n_models)]

    def timed(fn):
        times = []
        for _ in range(steps + 1):  # the first run is warmup
            torch.distributed.barrier()
            t0 = time.perf_counter()
            fn()
            torch.distributed.barrier()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    one = jobs(1, 1)
    inter = jobs(1, v)
    two = jobs(2, 1)
    return {
        "1f1b": timed(lambda: run_pipeline(one_f_one_b(m, world, rank), one, state, shape, torch.float32)),
        "interleaved": timed(lambda: run_pipeline(build_order("interleaved", m, world, rank, v), inter, state,
                                                  shape, torch.float32)),
        "shared": timed(lambda: run_pipeline(build_order("shared", m, world, rank, 1, 2), two, state, shape,
                                             torch.float32)),
        "sequential": timed(lambda: [run_pipeline(one_f_one_b(m, world, rank), [j], state, shape, torch.float32)
                                     for j in two]),
    }


def simulate(orders: list[list], p: int, v: int, fwd: float, bwd: float) -> float:
    """Step time of per-rank action orders with zero-cost communication: each rank runs its actions
    in order, a forward waits for the previous virtual stage's forward of that micro-batch, a
    backward for the next stage's backward (the exact theory for unequal forward/backward costs)."""
    done: dict = {}
    clock = [0.0] * p
    pos = [0] * p
    last = p * v - 1
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                s = a.chunk * p + r
                dep = (("F", a.model, a.mb, s - 1) if s > 0 else None) if a.kind == "F" else \
                    (("B", a.model, a.mb, s + 1) if s < last else ("F", a.model, a.mb, s))
                if dep is not None and dep not in done:
                    break
                start = max(clock[r], done[dep] if dep else 0.0)
                clock[r] = start + (fwd if a.kind == "F" else bwd) / v
                done[(a.kind, a.model, a.mb, s)] = clock[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks")
    return max(clock)


def run(p: int = 4, m: int = 8, fwd_ms: float = 200.0, bwd_ms: float = 400.0, v: int = 2, steps: int = 1) -> dict:
    t = (fwd_ms + bwd_ms) / 1000
    per_rank = run_ranks(p, _worker, m, fwd_ms / 1000, bwd_ms / 1000, v, steps)
    measured = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    theory_1f1b = (p - 1) / (m + p - 1)
    res = {"p": p, "m": m, "v": v, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "steps": steps,
           "step_s": {k: round(x, 4) for k, x in measured.items()},
           "bubble": {"1f1b": 1 - m * t / measured["1f1b"], "interleaved": 1 - m * t / measured["interleaved"],
                      "shared": 1 - 2 * m * t / measured["shared"]},
           # interleaved: step (m + (p-1)/v) t, i.e. the bubble *time* is 1F1B's divided by v
           "bubble_theory": {"1f1b": theory_1f1b, "interleaved": ((p - 1) / v) / (m + (p - 1) / v),
                             "shared": (p - 1) / (2 * m + p - 1)},
           "interleaved_1f1b_bubble_over_v": round(theory_1f1b / v, 4),
           "shared_theory_units": 2 * m + p - 1, "sequential_theory_units": 2 * (m + p - 1),
           "shared_units": measured["shared"] / t, "sequential_units": measured["sequential"] / t}
    fwd, bwd = fwd_ms / 1000, bwd_ms / 1000
    sims = {"1f1b": simulate([one_f_one_b(m, p, r) for r in range(p)], p, 1, fwd, bwd),
            "interleaved": simulate([build_order("interleaved", m, p, r, v) for r in range(p)], p, v, fwd, bwd),
            "shared": simulate([build_order("shared", m, p, r, 1, 2) for r in range(p)], p, 1, fwd, bwd)}
    res["bubble_simulated"] = {k: round(1 - (2 if k == "shared" else 1) * m * t / x, 4) for k, x in sims.items()}
    res["bubble"] = {k: round(x, 4) for k, x in res["bubble"].items()}
    res["bubble_theory"] = {k: round(x, 4) for k, x in res["bubble_theory"].items()}
    res["shared_vs_theory"] = round(res["shared_units"] / res["shared_theory_units"], 4)
    res["shared_speedup"] = round(measured["sequential"] / measured["shared"], 4)
    return res


def format_result(res: dict) -> list[str]:
    lines = [f"bench pipeline: p={res['p']} stages, m={res['m']} micro-batches, forward {res['fwd_ms']} ms + "
             f"backward {res['bwd_ms']} ms per stage and micro-batch (sleep), v={res['v']} for interleaved"]
    for k in ("1f1b", "interleaved", "shared"):
        meas, theo = res["bubble"][k], res["bubble_theory"][k]
        sim = res["bubble_simulated"][k]
        lines.append(f"{k:12s} step {res['step_s'][k]:.3f} s  bubble {meas:.3f}  theory {theo:.3f} "
                     f"({(meas - theo) / theo * 100:+.1f}%)  simulated order {sim:.3f} ({(meas - sim) / sim * 100:+.1f}%)")
    lines.append(f"actor+critic shared schedule {res['shared_units']:.2f} t (theory {res['shared_theory_units']} t) vs "
                 f"actor then critic {res['sequential_units']:.2f} t (theory {res['sequential_theory_units']} t): "
                 f"{res['shared_speedup']:.3f}x faster, {100 * (res['shared_vs_theory'] - 1):+.1f}% off its theory")
    return lines
