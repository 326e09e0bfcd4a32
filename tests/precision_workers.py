"""Rank functions for the precision tests: fp16 overflow handling at TP2 x PP2 x DP2, FP8 layers at TP2."""
import torch

from engine.build import build_handle
from engine.checkpoint import RandomSource
from engine.config import ModelConfig, ParallelConfig, PrecisionSettings
from parallel.optimizer import OptimConfig
from parallel.precision import LossScaleConfig
from parallel.state import build_state

MODEL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64)


def _batches(step: int, dp_rank: int, dp: int, micro: int = 2, rows: int = 2, seq: int = 16):
    """This DP rank's share of a global step of dp * micro micro-batches (the same on every layout)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, MODEL.vocab_size, (dp * micro * rows, seq + 1), generator=g)
    mine = ids[dp_rank * micro * rows:(dp_rank + 1) * micro * rows]
    return [{"input_ids": m[:, :-1], "labels": m[:, 1:], "position_ids": torch.arange(seq).expand(rows, seq),
             "doc_ids": torch.zeros(rows, seq, dtype=torch.long)} for m in mine.split(rows)]


def fp16_overflow(rank, world, tp, pp, steps, inf_steps, hysteresis):
    """fp16 training where one TP rank (tp_rank 1 of the first stage of DP replica 0) finds an inf in
    its gradient at the steps in `inf_steps`, after the DP reduction (so only the found-inf all-reduce can
    tell the other ranks). Returns per-step metrics, the LR position, whether the parameters changed
    in each step, and the final parameters."""
    from engine.train import train_step

    state = build_state(rank, tp, pp, world // (tp * pp), torch.device("cpu"))
    settings = PrecisionSettings(precision="fp16", loss_scale=LossScaleConfig(initial=2.0 ** 12, hysteresis=hysteresis,
                                                                            growth_interval=1000))
    handle = build_handle(RandomSource(MODEL, 0), state, ParallelConfig(tp=tp, pp=pp), settings,
                          OptimConfig(lr=1e-2, warmup_steps=2, min_lr=1e-3), steps, ids=lambda mb: mb["input_ids"])
    plant = {"step": 0}
    real_finish = handle.ddp.finish_grad_sync

    def finish_then_plant():
        real_finish()
        if plant["step"] in inf_steps and (state.tp_rank, state.pp_rank, state.dp_rank) == (1, 0, 0):
            handle.params[3].main_grad.view(-1)[0] = float("inf")

    handle.ddp.finish_grad_sync = finish_then_plant
    out = []
    for step in range(1, steps + 1):
        plant["step"] = step
        before = [p.detach().clone() for p in handle.params]
        line = train_step(handle, _batches(step, state.dp_rank, state.dp))
        changed = any(not torch.equal(a, p) for a, p in zip(before, handle.params))
        out.append({**line, "changed": changed, "lr_position": handle.steps})
    return {"lines": out, "coords": (state.tp_rank, state.pp_rank, state.dp_rank),
            "params": {n: p.detach().clone() for n, p in handle.named}}


def fp8_layers_tp(rank, world, x, w_col, w_row, g, recipe, tp, steps=1):
    """Column- then row-parallel FP8 layers (sequence parallel at tp > 1) on full tensors given by the
    test: returns the full output and the full input / weight gradients, and the FP8 scales."""
    from parallel import comm
    from parallel.fp8 import FP8Group
    from parallel.layers import ColumnParallelLinear, RowParallelLinear
    from parallel.precision import FP8Config

    state = build_state(rank, tp, 1, world // tp, torch.device("cpu"))
    sp = tp > 1
    col = ColumnParallelLinear(w_col.shape[1], w_col.shape[0], state.tp_group, sequence_parallel=sp,
                               dtype=torch.bfloat16, fp8=True)
    row = RowParallelLinear(w_row.shape[1], w_row.shape[0], state.tp_group, sequence_parallel=sp,
                            dtype=torch.bfloat16, fp8=True)
    with torch.no_grad():
        col.weight.copy_(comm.split(w_col, state.tp_group, 0))
        row.weight.copy_(comm.split(w_row, state.tp_group, 1))
    group = None
    if recipe is not None:  # None: the bf16 reference
        group = FP8Group(["col", "row"], FP8Config(recipe=recipe), state.device, state.tp_group,
                         [state.tp_dp_group] if state.tp_dp_group is not None else [])
        col.fp8_meta, row.fp8_meta = group.meta(0), group.meta(1)
    for _ in range(steps):
        for p in (col.weight, row.weight):
            p.grad = None
        xl = comm.split(x, state.tp_group, 1).detach().requires_grad_() if sp else x.detach().clone().requires_grad_()
        y = row(col(xl))
        y.backward(comm.split(g, state.tp_group, 1) if sp else g)
        if group is not None:
            group.step_end()
    gather_seq = (lambda t: comm.all_gather(t, state.tp_group, 1)) if sp else (lambda t: t)
    return {"y": gather_seq(y.detach()), "dx": gather_seq(xl.grad),
            "scales": None if group is None else group.scale.clone(),
            "dw_col": comm.all_gather(col.weight.grad.contiguous(), state.tp_group, 0),
            "dw_row": comm.all_gather(row.weight.grad.contiguous(), state.tp_group, 1)}
