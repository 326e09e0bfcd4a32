"""Pipeline parallelism: the layer partition, the schedules, and one executor that runs any of them.

A schedule is only an *order* of actions for one rank, F (forward) or B (backward) of a micro-batch
on one model chunk, built by a short function whose warmup / steady / cooldown phases are visible:

  one_f_one_b    warmup: pp-1-rank forwards; steady: one forward, one backward; cooldown: backwards
  interleaved    the same over v model chunks per rank (virtual stages), Megatron's ordering
  shared         1F1B over the micro-batches of two models (actor and critic) at once, so one
                 model's work fills the other's bubbles: (2m+p-1) t instead of 2 (m+p-1) t

The executor (`run_pipeline`) receives a stage's input (blocking), runs the `(output, loss_fn)`
forward step, sends the output without blocking and frees its data once the send completed (only the
autograd graph is kept for backward); backward receives the output gradient, back-propagates and sends
the input gradient. Sends never block, receives do; every order above is deadlock-free with that.

Virtual stages: rank r holds chunks c = 0..v-1, chunk c of rank r is virtual stage s = c*pp + r, and
stage s feeds stage s+1 (on rank (s+1) % pp). Without interleaving v = 1 and s = r.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from parallel import comm
from parallel.errors import ConfigError


def partition_layers(num_layers: int, pp: int, explicit: list[int] | None = None) -> list[range]:
    """Layer ranges per stage: `explicit` counts per stage, or an even split (extra layers go to the
    middle-to-last stages, since the first stage also carries the embedding)."""
    if explicit:
        if len(explicit) != pp or sum(explicit) != num_layers or min(explicit) < 1:
            raise ConfigError(f"layer split {explicit} must have {pp} positive entries summing to {num_layers}")
        counts = list(explicit)
    else:
        if num_layers < pp:
            raise ConfigError(f"{num_layers} layers cannot fill {pp} pipeline stages")
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if s >= pp - extra else 0) for s in range(pp)]
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


def forward_backward_no_pipelining(forward_step, model, micro_batches, forward_only: bool = False,
                                   loss_scale: float = 1.0) -> list:
    """Run every micro-batch forward (+ backward), accumulating gradients; returns each loss_fn's stats.

    forward_step(model, micro_batch) -> (output, loss_fn); loss_fn(output) -> (loss, stats). The loss
    must already be scaled for accumulation (e.g. divided by the step's token count), which keeps
    schedules loss-agnostic: the same schedule runs SFT, the PPO policy loss and the value loss.
    `loss_scale` multiplies the loss before backward (fp16 loss scaling); stats are left as they are.
    """
    stats = []
    for mb in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            output, loss_fn = forward_step(model, mb)
            loss, s = loss_fn(output)
        if not forward_only:
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        stats.append(s)
    return stats


def stats_to_host(stats: list[dict]) -> list[dict]:
    """0-dim tensors among loss_fn stats become Python floats, in one device-to-host copy (a step
    syncs with the host once, not once per micro-batch); other values are kept."""
    where = [(i, k) for i, s in enumerate(stats) for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
    if not where:
        return stats
    values = torch.stack([stats[i][k].detach().double() for i, k in where]).tolist()
    out = [dict(s) for s in stats]
    for (i, k), v in zip(where, values):
        out[i][k] = v
    return out


def share_stats(stats: list[dict] | None, state, src: int) -> list[dict]:
    """The last stage's stats on every stage of the pipeline: numbers by one object broadcast,
    tensors (e.g. per-token scores) by tensor broadcasts on the device."""
    if state.pp == 1:
        return stats
    is_src = state.pp_rank == src
    shapes = None
    if is_src:
        shapes = [{k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v) for k, v in s.items()}
                  for s in stats]
    shapes = comm.broadcast_object(shapes, state.pp_group, src)
    out = []
    for i, meta in enumerate(shapes):
        row = {}
        for k, (shape, what) in meta.items():
            if shape == "value":
                row[k] = what
                continue
            t = stats[i][k].contiguous() if is_src else torch.empty(shape, dtype=what, device=state.device)
            row[k] = comm.broadcast(t, state.pp_group, src)
        out.append(row)
    return out


# ---- schedules: the order of actions on one rank ---------------------------------------------------

@dataclass(frozen=True)
class Action:
    kind: str  # "F" or "B"
    mb: int
    chunk: int = 0
    model: int = 0


def forward_only_order(m: int, v: int = 1, models: int = 1) -> list[Action]:
    """Every forward, micro-batch by micro-batch, each through this rank's chunks in order."""
    return [Action("F", i, c, k) for k in range(models) for i in range(m) for c in range(v)]


def one_f_one_b(m: int, pp: int, rank: int) -> list[Action]:
    warmup = min(pp - rank - 1, m)
    order = [Action("F", i) for i in range(warmup)]          # warmup: fill the pipeline
    for i in range(m - warmup):                                # steady: one forward, one backward
        order += [Action("F", warmup + i), Action("B", i)]
    order += [Action("B", i) for i in range(m - warmup, m)]    # cooldown: drain it
    return order


def interleaved(m: int, pp: int, rank: int, v: int) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of pp; the bubble
    shrinks v-fold. Needs m to be a multiple of pp."""
    if m % pp:
        raise ConfigError(f"interleaved pipelining needs micro-batches ({m}) divisible by pp ({pp})")
    total = m * v

    def forward(k):
        return Action("F", (k // (pp * v)) * pp + k % pp, (k // pp) % v)

    def backward(k):
        return Action("B", (k // (pp * v)) * pp + k % pp, v - 1 - (k // pp) % v)

    warmup = total if m == pp else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def shared(m: int, pp: int, rank: int, models: int = 2) -> list[Action]:
    """1F1B over the micro-batches of several models with the same stage split (actor and critic):
    their micro-batches alternate in one stream, so the pipeline fills and drains once."""
    return [Action(a.kind, a.mb // models, 0, a.mb % models) for a in one_f_one_b(m * models, pp, rank)]


# ---- the executor ----------------------------------------------------------------------------------

@dataclass
class PipelineJob:
    """One model in a pipeline run: this rank's chunks, its step function and its micro-batches;
    the last stage multiplies its losses by `loss_scale` before backward (fp16 loss scaling)."""
    chunks: list[torch.nn.Module]
    forward_step: Callable
    micro_batches: list
    loss_scale: float = 1.0
    stats: list = field(default_factory=list)


def run_pipeline(order: list[Action], jobs: list[PipelineJob], state, shape_fn: Callable, dtype: torch.dtype,
                 forward_only: bool = False) -> list[list]:
    """Run `order` on this rank; returns, per job, the loss_fn stats of every micro-batch on every
    stage of the pipeline (numbers as Python floats, tensors on the device; see share_stats).

    shape_fn(micro_batch) -> shape of the activation between stages for that micro-batch (every rank
    has the micro-batches, so shapes never travel). Non-first chunks get their input through
    `chunk.set_input_tensor(x)` before the forward step (Megatron's convention).
    """
    pp, rank = state.pp, state.pp_rank
    v = len(jobs[0].chunks)
    last_stage = pp * v - 1
    peers = state.pp_ranks
    saved: dict = {}
    pending: list = []  # (send handle, tensor to free once sent or None)

    def tag(job: int, edge: int, backward: bool) -> int:
        return (job * (last_stage + 1) + edge) * 2 + int(backward)

    def drain(block: bool = False):
        keep = []
        for work, out in pending:
            if block or work.is_completed():
                work.wait()
                if out is not None:
                    _free(out)
            else:
                keep.append((work, out))
        pending[:] = keep

    for a in order:
        job = jobs[a.model]
        s = a.chunk * pp + rank
        key = (a.model, a.chunk, a.mb)
        mb = job.micro_batches[a.mb]
        if a.kind == "F":
            x = None
            if s > 0:
                x = torch.empty(shape_fn(mb), dtype=dtype, device=state.device)
                comm.p2p([], [(x, peers[(s - 1) % pp], tag(a.model, s - 1, False))])
                x.requires_grad_(not forward_only)
                job.chunks[a.chunk].set_input_tensor(x)
            with torch.set_grad_enabled(not forward_only):
                out, loss_fn = job.forward_step(job.chunks[a.chunk], mb)
                if s == last_stage:
                    out, st = loss_fn(out)
                    job.stats.append((a.mb, st))
            if s < last_stage:
                sends = comm.p2p([(out.detach(), peers[(s + 1) % pp], tag(a.model, s, False))], [])
                pending += [(w, out if not forward_only else None) for w in sends]
            if not forward_only:
                saved[key] = (x, out, tuple(out.shape))
        else:
            x, out, shape = saved.pop(key)
            if s == last_stage:
                (out * job.loss_scale if job.loss_scale != 1.0 else out).backward()
            else:
                grad = torch.empty(shape, dtype=dtype, device=state.device)
                comm.p2p([], [(grad, peers[(s + 1) % pp], tag(a.model, s, True))])
                _backward(out, grad)
            if s > 0:
                pending += [(w, None) for w in comm.p2p([(x.grad, peers[(s - 1) % pp], tag(a.model, s - 1, True))], [])]
        drain()
    drain(block=True)
    results = []
    for job in jobs:
        stats = stats_to_host([st for _, st in sorted(job.stats, key=lambda t: t[0])])
        job.stats = []
        results.append(share_stats(stats, state, pp - 1))
    return results


def _free(out: torch.Tensor) -> None:
    """Drop a sent activation's data; its autograd graph (all backward needs) stays."""
    if out._base is None:
        out.data = torch.empty((1,), dtype=out.dtype, device=out.device)


def _backward(out: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from an output whose data may have been freed (torch.autograd.backward would reject
    the shape mismatch; the engine call does not look at the data)."""
    from torch.autograd.variable import Variable
    Variable._execution_engine.run_backward((out,), (grad,), False, False, (), True, True)


def build_order(schedule: str, m: int, pp: int, rank: int, v: int = 1, models: int = 1,
                forward_only: bool = False) -> list[Action]:
    if forward_only:
        return forward_only_order(m, v, models)
    if schedule == "1f1b" and models == 1 and v == 1:
        return one_f_one_b(m, pp, rank)
    if schedule == "interleaved" and models == 1:
        return interleaved(m, pp, rank, v)
    if schedule == "shared" and v == 1:
        return shared(m, pp, rank, models)
    raise ConfigError(f"schedule {schedule!r} does not run {models} model(s) with {v} chunk(s) per rank")
