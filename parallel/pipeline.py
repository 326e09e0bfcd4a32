"""Pipeline parallelism: which decoder layers each stage holds.

(The schedules arrive with the 3D-parallel work; the partition is needed now by checkpoints.)
"""
from __future__ import annotations

from engine.errors import ConfigError


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


def forward_backward_no_pipelining(forward_step, model, micro_batches, forward_only: bool = False) -> list:
    """Run every micro-batch forward (+ backward), accumulating gradients; returns each loss_fn's stats.

    forward_step(model, micro_batch) -> (output, loss_fn); loss_fn(output) -> (loss, stats). The loss
    must already be scaled for accumulation (e.g. divided by the step's token count), which keeps
    schedules loss-agnostic: the same schedule runs SFT, the PPO policy loss and the value loss.
    """
    import torch

    stats = []
    for mb in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            output, loss_fn = forward_step(model, mb)
            loss, s = loss_fn(output)
        if not forward_only:
            loss.backward()
        stats.append(s)
    return stats
