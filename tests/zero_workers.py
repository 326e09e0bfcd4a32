"""Rank functions for the distributed-optimizer (ZeRO-1) tests: several precision / optimizer
variants trained for a few steps on the same processes, each saving a native checkpoint."""
import dataclasses

import torch

from engine import checkpoint as ckpt
from engine.build import build_handle
from engine.config import ParallelConfig, PrecisionSettings
from parallel.optimizer import OptimConfig
from parallel.precision import LossScaleConfig
from parallel.state import build_state
from tests.precision_workers import MODEL, _batches


def train_variants(rank, world, tp, pp, variants, out_root, steps=3, vp=1, micro=2):
    """variants: {name: {"precision", "distributed", "overlap", "sp", "tie", "inf_step"}}; returns
    {name: {"losses", "skipped", "grad_norms"}} and writes out_root/name (native checkpoint). `micro`
    micro-batches per DP rank: the global batch is dp * micro (the same data on every layout)."""
    from engine.train import train_step

    state = build_state(rank, tp, pp, world // (tp * pp), torch.device("cpu"))
    results = {}
    for name, v in variants.items():
        settings = PrecisionSettings(precision=v.get("precision", "fp32"),
                                     loss_scale=LossScaleConfig(initial=2.0 ** 12, hysteresis=1))
        par = ParallelConfig(tp=tp, pp=pp, sequence_parallel=v.get("sp", False) and tp > 1, virtual_stages=vp,
                             schedule="interleaved" if vp > 1 else "1f1b")
        optim = OptimConfig(lr=1e-2, warmup_steps=2, min_lr=1e-3, distributed=v.get("distributed", False),
                            overlap_param_gather=v.get("overlap", False))
        model = dataclasses.replace(MODEL, tie_word_embeddings=v.get("tie", False))
        handle = build_handle(ckpt.RandomSource(model, 0), state, par, settings, optim, steps,
                              ids=lambda mb: mb["input_ids"])
        if v.get("inf_step"):
            _plant_inf(handle, state, v["inf_step"])
        lines = []
        for step in range(1, steps + 1):
            handle.plant_step = step
            lines.append(train_step(handle, _batches(step, state.dp_rank, state.dp, micro=micro)))
        ckpt.save_native(handle.chunks, state, f"{out_root}/{name}")
        results[name] = {"losses": [x["loss"] for x in lines], "skipped": [bool(x.get("skipped")) for x in lines],
                         "grad_norms": [x["grad_norm"] for x in lines], "steps": handle.steps}
    return results


def _plant_inf(handle, state, at_step):
    """An inf in one gradient entry that the rank (tp 1, pp 0, dp 0) itself steps (so under ZeRO-1 it
    is in that rank's shard), after the DP reduction: only the found-inf all-reduce tells the others."""
    real_finish = handle.ddp.finish_grad_sync

    def finish_then_plant():
        real_finish()
        if handle.plant_step == at_step and (state.tp_rank, state.pp_rank, state.dp_rank) == (min(1, state.tp - 1), 0, 0):
            handle._norm_grads[0].view(-1)[0] = float("inf")

    handle.ddp.finish_grad_sync = finish_then_plant


def canonical(path) -> dict:
    src = ckpt.NativeSource(path)
    return {n: src.read(n, None, 0, 0).float() for n in src.tensors}
