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


def trained_handle(rank: int, world: int, cfg, par=None, precision: str = "bf16", distributed: bool = False,
                   batch: int = 1, seq: int = 64, micro_batches: int = 1):
    """A training handle on a TP x PP x DP grid of `world` gloo ranks (CUDA where present) after one
    optimizer step, so every lazily created buffer exists; returns (handle, one step's micro-batches,
    the step function). The micro-batches are causal LM rows of random tokens (no packing mask)."""
    from engine.build import build_handle
    from engine.checkpoint import RandomSource
    from engine.config import ParallelConfig, PrecisionSettings
    from engine.train import train_step
    from parallel.optimizer import OptimConfig
    from parallel.state import build_state

    par = par or ParallelConfig()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    state = build_state(rank, par.tp, par.pp, world // (par.tp * par.pp), device)
    handle = build_handle(RandomSource(cfg, 0), state, par, PrecisionSettings(precision=precision),
                          OptimConfig(distributed=distributed), 10, ids=lambda mb: mb["input_ids"])
    g = torch.Generator().manual_seed(state.dp_rank)
    micro = []
    for _ in range(micro_batches):
        ids = torch.randint(3, cfg.vocab_size, (batch, seq + 1), generator=g)
        micro.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq).expand(batch, seq)})
    train_step(handle, micro)
    return handle, micro, train_step


def state_bytes(handle, distributed: bool) -> dict:
    """Bytes of the distinct storages the handle keeps between steps: parameters (or the ZeRO
    parameter buffer), the fp32 gradient buffer, fp32 masters that are not the parameters, Adam
    moments and the step counter."""
    opt = handle.optimizer
    params = [handle.ddp.param_buffer] if distributed else handle.params
    param_ptrs = {t.untyped_storage().data_ptr() for t in params}
    masters = [m for m in opt.masters if m.untyped_storage().data_ptr() not in param_ptrs]
    return {"param_bytes": _bytes(params), "grad_bytes": _bytes([handle.ddp.buffer]),
            "optimizer_bytes": _bytes(masters + opt.exp_avg + opt.exp_avg_sq + [opt.step_t])}


def measure_rank(rank: int, world: int, size_name: str, distributed: bool, precision: str) -> dict:
    from tools.bench_train import SIZES

    cfg = SIZES[size_name].model_config()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    handle, _, _ = trained_handle(rank, world, cfg, precision=precision, distributed=distributed)
    out = {"params": sum(p.numel() for p in handle.params), **state_bytes(handle, distributed)}
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


# --- peak memory of a training step against the planner's prediction (`trident bench memory --peak`)

PEAK_MODEL = {"hidden": 256, "layers": 4, "heads": 4, "ffn": 688, "vocab": 512, "seq": 128}
"""Small enough for 2 CPU cores, with the decoder layers (not the head) holding most activations."""
PEAK_LAYOUTS = [dict(tp=2), dict(tp=2, sp=True), dict(pp=2), dict(dp=2), dict(dp=2, zero=1)]
"""Each with recomputation off and on (world size = tp x pp x dp)."""


def _peak_layouts(layouts) -> list[dict]:
    return [{"tp": 1, "pp": 1, "dp": 1, "sp": False, "zero": 0, **lay, "recompute": rc}
            for lay in layouts for rc in ("none", "full")]


def peak_rank(rank: int, world: int, layouts: list[dict], dims: dict, micro_batch: int, micro_batches: int,
              precision: str) -> list[dict]:
    """Per layout: the handle's persistent bytes plus the peak of the tensors a second training step
    allocates (tools/memtrack.py on CPU; torch.cuda.max_memory_allocated on CUDA)."""
    import gc

    from engine.config import ModelConfig, ParallelConfig
    from tools.memtrack import LiveBytes

    cfg = ModelConfig(arch="llama", vocab_size=dims["vocab"], hidden_size=dims["hidden"],
                      intermediate_size=dims["ffn"], num_layers=dims["layers"], num_heads=dims["heads"],
                      max_position_embeddings=dims["seq"])
    out = []
    for lay in layouts:
        par = ParallelConfig(tp=lay["tp"], pp=lay["pp"], sequence_parallel=lay["sp"], recompute=lay["recompute"] == "full")
        handle, micro, step = trained_handle(rank, world, cfg, par, precision, bool(lay["zero"]), micro_batch,
                                             dims["seq"], micro_batches)
        kept = state_bytes(handle, bool(lay["zero"]))
        gc.collect()
        device = handle.state.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(handle, micro)
            step_peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with LiveBytes() as live:
                step(handle, micro)
            step_peak = live.peak
        out.append({**kept, "step_peak_bytes": step_peak, "peak_bytes": sum(kept.values()) + step_peak,
                    "pp_rank": handle.state.pp_rank})
        del handle, micro
        gc.collect()
    return out


def run_peak(layouts=None, dims=None, micro_batch: int = 4, micro_batches: int = 2,
             precision: str = "bf16") -> dict:
    """Measured peak bytes per rank (the largest over ranks) against tools/perf_model.memory_bytes
    with trident's activation count, for each layout; all layouts of one world size share a launch."""
    from parallel.launch import run_ranks
    from tools.perf_model import Layout, Shape, memory_bytes

    dims = dims or PEAK_MODEL
    shape = Shape(dims["hidden"], dims["layers"], dims["heads"], dims["heads"], dims["ffn"], dims["vocab"], dims["seq"])
    by_world: dict[int, list[dict]] = {}
    for lay in _peak_layouts(layouts or PEAK_LAYOUTS):
        by_world.setdefault(lay["tp"] * lay["pp"] * lay["dp"], []).append(lay)
    rows = []
    for world, lays in by_world.items():
        ranks = run_ranks(world, peak_rank, lays, dims, micro_batch, micro_batches, precision)
        for i, lay in enumerate(lays):
            worst = max((r[i] for r in ranks), key=lambda r: r["peak_bytes"])
            pred = memory_bytes(shape, Layout(lay["tp"], lay["pp"], lay["dp"], micro_batch, 1, lay["recompute"],
                                              lay["zero"], lay["sp"]), precision, "trident", micro_batches)
            rows.append({**lay, "measured_bytes": worst["peak_bytes"], "measured_step_bytes": worst["step_peak_bytes"],
                         "predicted_bytes": pred["total"], "predicted_activation_bytes": pred["activations"],
                         "error": pred["total"] / worst["peak_bytes"] - 1})
    return {"dims": dims, "micro_batch": micro_batch, "micro_batches": micro_batches, "precision": precision,
            "rows": rows, "max_abs_error": max(abs(r["error"]) for r in rows)}


def report_peak(res: dict) -> list[str]:
    mb = 2**20
    lines = [f"peak bytes per rank of a training step, model {res['dims']}, {res['micro_batches']} micro-batches of "
             f"{res['micro_batch']}, {res['precision']}: measured (largest rank) vs trident plan's memory model",
             f"{'layout':<34}{'measured':>10}{'(step)':>9}{'predicted':>11}{'(acts)':>9}{'error':>8}"]
    for r in res["rows"]:
        name = (f"tp{r['tp']} pp{r['pp']} dp{r['dp']}{' sp' if r['sp'] else ''}{' zero1' if r['zero'] else ''} "
                f"recompute {r['recompute']}")
        lines.append(f"{name:<34}{r['measured_bytes'] / mb:>9.1f}M{r['measured_step_bytes'] / mb:>8.1f}M"
                     f"{r['predicted_bytes'] / mb:>10.1f}M{r['predicted_activation_bytes'] / mb:>8.1f}M{r['error']:>+8.1%}")
    return lines
