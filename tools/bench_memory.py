"""`trident bench memory`: bytes per rank of parameters, gradients and optimizer state, measured on the
training handle's own tensors at DP 1, 2 and 4 (gloo ranks here), plain DDP and ZeRO-1, next to
Megatron's formula for bf16 parameters with fp32 gradients and fp32 Adam state:
18 bytes per parameter without the distributed optimizer, 6 + 12/dp with it.

Measured means: the distinct storages the handle holds after a training step (parameters or the
ZeRO parameter buffer, the fp32 gradient buffer, fp32 masters that are not the parameters, Adam
moments, the step counter), bucket padding included; on CUDA also torch.cuda.memory_allocated.
"""
from __future__ import annotations

import torch


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_rank(rank: int, world: int, size_name: str, distributed: bool, precision: str) -> dict:
    from engine.build import build_handle
    from engine.checkpoint import RandomSource
    from engine.config import ParallelConfig, PrecisionSettings
    from engine.train import train_step
    from parallel.optimizer import OptimConfig
    from parallel.state import build_state
    from tools.bench_train import SIZES

    size = SIZES[size_name]
    cfg = size.model_config()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    state = build_state(rank, 1, 1, world, device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    handle = build_handle(RandomSource(cfg, 0), state, ParallelConfig(), PrecisionSettings(precision=precision),
                          OptimConfig(distributed=distributed), 10, ids=lambda mb: mb["input_ids"])
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, cfg.vocab_size, (1, 65), generator=g)
    train_step(handle, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(64)[None],
                         "doc_ids": torch.zeros(1, 64, dtype=torch.long)}])
    opt = handle.optimizer
    params = [handle.ddp.param_buffer] if distributed else handle.params
    param_ptrs = {t.untyped_storage().data_ptr() for t in params}
    masters = [m for m in opt.masters if m.untyped_storage().data_ptr() not in param_ptrs]
    out = {"params": sum(p.numel() for p in handle.params),
           "param_bytes": _bytes(params), "grad_bytes": _bytes([handle.ddp.buffer]),
           "optimizer_bytes": _bytes(masters + opt.exp_avg + opt.exp_avg_sq + [opt.step_t])}
    if device.type == "cuda":
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device) - before
    return out


def formula_bytes_per_param(dp: int, distributed: bool) -> float:
    """Megatron (bf16 params, fp32 grads, fp32 master + 2 moments): 2 + 4 + 12, or 2 + 4 + 12/dp."""
    return 6 + 12 / dp if distributed else 18.0


def run(size: str = "S", dps=(1, 2, 4), precision: str = "bf16") -> dict:
    from parallel.launch import run_ranks

    rows = []
    for distributed in (False, True):
        for dp in dps:
            ranks = run_ranks(dp, measure_rank, size, distributed, precision)
            worst = max(ranks, key=lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"])
            n = worst["params"]
            total = worst["param_bytes"] + worst["grad_bytes"] + worst["optimizer_bytes"]
            expect = formula_bytes_per_param(dp, distributed) * n
            rows.append({"zero": distributed, "dp": dp, "params": n, **{k: worst[k] for k in worst if k != "params"},
                         "bytes_per_param": round(total / n, 3),
                         "formula_bytes_per_param": round(formula_bytes_per_param(dp, distributed), 3),
                         "measured_over_formula": round(total / expect, 4)})
    return {"size": size, "precision": precision, "rows": rows}


def report(res: dict) -> list[str]:
    lines = [f"bytes per rank, size {res['size']} ({res['rows'][0]['params'] / 1e6:.1f} M params), "
             f"{res['precision']} params + fp32 grads + fp32 Adam",
             f"{'optimizer':<10}{'dp':>3}{'params':>10}{'grads':>10}{'optim':>10}{'B/param':>9}{'formula':>9}{'ratio':>8}"]
    for r in res["rows"]:
        mb = 1024 ** 2
        lines.append(f"{'ZeRO-1' if r['zero'] else 'DDP':<10}{r['dp']:>3}{r['param_bytes'] / mb:>9.1f}M"
                     f"{r['grad_bytes'] / mb:>9.1f}M{r['optimizer_bytes'] / mb:>9.1f}M{r['bytes_per_param']:>9.2f}"
                     f"{r['formula_bytes_per_param']:>9.2f}{r['measured_over_formula']:>8.3f}")
    return lines
