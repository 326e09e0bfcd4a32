"""A performance and memory model of one training step of a Llama/GPT-style decoder under TP x PP x DP,
for `trident plan`. Everything is closed-form, so it ranks thousands of layouts in well under a second.

Compute: per layer and micro-batch, the forward GEMM FLOPs 2 s (matmul parameters) + 4 s^2 h (scores
and context; Megatron's convention, no causal halving), the LM head 2 s h V; a step runs each layer
3 times (forward, backward = 2) plus 1 with full recomputation, or plus the attention core with
selective recomputation; the LM head 3 times. For GPT shapes (no GQA, 4h MLP) this is Megatron's
96 B s l h^2 (1 + s/(6h) + V/(16 l h)) with full recomputation. GEMMs run at `gemm_eff` of the peak;
memory-bound work (the unfused softmax / mask / dropout over the s x s scores, `score_bytes` per score
element and pass, and `elem_bytes` per b s h element and pass) at HBM bandwidth. Those two constants
are the calibration: fitted by `calibrate` (a grid search) on half of Table 1 of Narayanan et al. 2021
("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM") and checked on the
other half (tests/test_plan.py).

Communication (ring, bandwidth + latency): TP all-reduces (or SP all-gather + reduce-scatter, the
same volume) 2 per layer per pass over NVLink, not overlapped; PP p2p of the activation per
micro-batch; the DP gradient all-reduce (ZeRO-1: reduce-scatter + all-gather, the same volume), over
the inter-node fabric once the job spans nodes, exposed except for the part `dp_overlap` hides. The
1F1B bubble is (p - 1) / (v m). Memory is the weights, gradients and optimizer state of the most
loaded stage (18 bytes per parameter, or 6 + 12/dp with ZeRO-1, for 16-bit parameters) plus its
activations: Korthikanti et al. 2022 for Megatron's kernels, or trident's own kernels' saved tensors
(`trident_layer`), checked against peak memory measured on CPU runs (`trident bench memory --peak`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from engine.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_gib: float
    hbm_tbps: float
    nvlink_gbps: float
    """Per-GPU NVLink bus bandwidth a ring all-reduce sees (GB/s, one direction)."""
    net_gbps: float
    """Per-GPU inter-node bandwidth (GB/s, one direction)."""
    per_node: int = 8


GPUS = {g.name: g for g in [
    GPU("a100-40gb", 312, 0, 40, 1.555, 240, 25),
    GPU("a100-80gb", 312, 0, 80, 2.039, 240, 25),
    GPU("h100-sxm", 989, 1979, 80, 3.35, 360, 50),
    GPU("h200", 989, 1979, 141, 4.8, 360, 50),
]}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    swiglu: bool = True
    tied: bool = False
    """Input embedding and LM head share one matrix (GPT)."""

    @property
    def layer_matmul_params(self) -> int:
        hd = self.hidden // self.heads
        attn = self.hidden * hd * (self.heads + 2 * self.kv_heads) + self.hidden * self.hidden
        return attn + (3 if self.swiglu else 2) * self.hidden * self.ffn

    @property
    def params(self) -> int:
        return self.layers * (self.layer_matmul_params + 2 * self.hidden) + (1 if self.tied else 2) * self.vocab * self.hidden


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    vp: int = 1
    recompute: str = "none"
    """none | selective | full"""
    zero: int = 0
    sp: bool = False


@dataclass(frozen=True)
class Calibration:
    gemm_eff: float = 0.61
    """Share of the peak the GEMMs reach (fitted on Table 1's even rows)."""
    score_bytes: float = 9.5
    """HBM bytes per attention-score element and pass (unfused softmax / mask / dropout; 0 for flash)."""
    elem_bytes: float = 0.0
    """HBM bytes per b s h element and pass for the other elementwise work."""
    latency_s: float = 5e-6
    """Per-collective latency."""
    grad_comm_bytes: float = 2.0
    """Bytes per gradient element the DP reduction sends (2: Megatron 2021's fp16; 4: fp32)."""
    dp_overlap: float = 0.0
    """Share of the DP reduction hidden behind the backward pass (trident's buckets overlap it)."""
    p2p_scatter: bool = True
    """PP sends 1/tp of the activation per TP rank (Megatron's scatter / gather optimisation)."""
    activations: str = "megatron"
    """Which kernels' saved tensors the activation memory counts: megatron | trident (memory_bytes)."""
    nongemm_layer_s: float = 0.0
    """Measured seconds per token of one decoder layer's non-GEMM work (norms, RoPE, the attention core,
    SwiGLU, residual adds), forward + backward; when set it replaces the attention-core FLOPs and the
    score / elementwise bytes (tools/plan_calibrate.nongemm_s measures it on CPUs)."""
    nongemm_head_s: float = 0.0
    """Measured seconds per token of the loss's softmax over the vocabulary, forward + backward."""
    nongemm_layer_fwd_s: float = 0.0
    """The same as nongemm_layer_s for a forward pass without gradients (scoring)."""
    nongemm_head_fwd_s: float = 0.0
    """The same as nongemm_head_s for a forward pass without gradients (scoring)."""
    optimizer_pass: bool = False
    """Count the optimizer step as memory-bound work (OPTIMIZER_BYTES per local parameter at HBM
    bandwidth). Off for Table 1, whose fitted GEMM share absorbs it; on where the share is measured."""


MEGATRON_2021 = Calibration()


def step_flops(shape: Shape, batch: int, recompute: str) -> tuple[float, float]:
    """(hardware FLOPs incl. recomputation, model FLOPs) of one step over `batch` sequences."""
    s, h = shape.seq, shape.hidden
    layer_fwd = 2 * s * shape.layer_matmul_params + 4 * s * s * h
    attn_core = 4 * s * s * h
    head_fwd = 2 * s * h * shape.vocab
    extra = {"none": 0.0, "selective": attn_core, "full": layer_fwd}[recompute]
    model = batch * (3 * shape.layers * layer_fwd + 3 * head_fwd)
    return model + batch * shape.layers * extra, model


BYTES_PER_PARAM = {"fp32": (4, 4, 8), "bf16": (2, 4, 12), "fp16": (2, 4, 12), "fp8": (2, 4, 12)}
"""(weights, gradients, optimizer) bytes per parameter: 16-bit (or fp8-cast bf16) weights with fp32
gradients, fp32 master weights and two fp32 Adam moments; fp32 weights are their own masters."""


OPTIMIZER_BYTES = {"fp32": 36, "bf16": 38, "fp16": 38, "fp8": 38}
"""Bytes the step moves per parameter: the grad-norm read (4); AdamW reading the fp32 gradient,
master, m and v (16) and writing master, m and v (12); zeroing the gradient (4); the 16-bit copy of
the new weight (2)."""


def _megatron_layer(shape: Shape, lay: Layout) -> float:
    """Korthikanti et al. 2022, 16-bit activations with dropout and the unfused s x s softmax."""
    t, sbh, a, s, h = lay.tp, shape.seq * lay.micro_batch * shape.hidden, shape.heads, shape.seq, shape.hidden
    if lay.recompute == "full":
        return 2 * sbh / (t if lay.sp else 1)
    if lay.recompute == "selective":
        return 34 * sbh / t if lay.sp else sbh * (10 + 24 / t)
    return sbh * (34 + 5 * a * s / h) / t if lay.sp else sbh * (10 + 24 / t + 5 * a * s / (h * t))


def trident_layer(shape: Shape, lay: Layout, e: int = 2) -> float:
    """What one of trident's decoder layers keeps for backward (engine/model.py with kernels/), in
    bytes, counted from the kernels' saved tensors: each RMSNorm its input and fp32 1/rms; the QKV and
    gate-up GEMMs their input (all-gathered under SP: trident saves the gathered copy, Megatron saves
    the shard and gathers again); rotated q and k and, alive through v, the QKV output (with GQA the
    repeated k and v instead); the attention output (= o_proj input) and fp32 log-sum-exp (a fused /
    flash kernel: no s x s scores); the gate-up output, silu(gate) and the down GEMM's input."""
    t, S, h, f = lay.tp, shape.seq * lay.micro_batch, shape.hidden, shape.ffn
    kvd = shape.kv_heads * (h // shape.heads)
    split = t if lay.sp else 1
    norms = 2 * S * (e * h + 4) / split
    gemm_inputs = 2 * e * S * h
    qkv = 3 * h if shape.kv_heads < shape.heads else (h + 2 * kvd) + (h + kvd)
    attn = e * S * (qkv + h) / t + 4 * S * shape.heads / t
    mlp = 4 * e * S * f / t
    return norms + gemm_inputs + attn + mlp


def _stage_bytes(shape: Shape, lay: Layout, first: bool, last: bool, precision: str, impl: str,
                 micro_batches: int | None) -> dict:
    t, p, b = lay.tp, lay.pp, lay.micro_batch
    s, h, V = shape.seq, shape.hidden, shape.vocab
    layers = math.ceil(shape.layers / p)
    params = layers * (shape.layer_matmul_params / t + 2 * h) + (first + last) * V * h / t + last * h
    w, g, o = BYTES_PER_PARAM[precision]
    weights, grads, optim = params * w, params * g, params * o / (lay.dp if lay.zero else 1)
    # micro-batches whose activations the stage holds at once: 1F1B keeps p in flight on the first
    # stage (one on the last); interleaving over v chunks adds (p - 1) / (p v) (Korthikanti et al.)
    depth = min(p, micro_batches or p) if first else 1
    in_flight = depth if lay.vp == 1 or p == 1 else depth * (1 + (p - 1) / (p * lay.vp))
    if impl == "megatron":
        acts = _megatron_layer(shape, lay) * layers * in_flight + last * 4 * s * b * V / t  # + fp32 logits
    else:
        e, S, split = (4 if precision == "fp32" else 2), s * b, t if lay.sp else 1
        layer = trident_layer(shape, lay, e)
        kept = e * S * h / split if lay.recompute == "full" else layer  # checkpointing keeps the input
        rope = 2 * e * S * (h // shape.heads)
        acts = (kept * layers + rope) * in_flight
        if lay.recompute == "full":
            acts += layer  # the layer recomputed in backward
        # backward working set of one layer: the MLP's input gradients and one weight gradient
        work = e * S * (3 * shape.ffn / t + 2 * h) + e * 2 * h * shape.ffn / t
        if last:  # final norm and head inputs, logits (kept by the loss), their gradient, the head's dW
            acts += S * (2 * e * h + 4) + 2 * e * S * V / t
            work = max(work, e * V * h / t)
        acts += work
    return {"weights": weights, "grads": grads, "optimizer": optim, "activations": acts,
            "total": weights + grads + optim + acts}


def memory_bytes(shape: Shape, lay: Layout, precision: str = "bf16", impl: str = "megatron",
                 micro_batches: int | None = None) -> dict:
    """Per-GPU bytes of the most loaded pipeline stage (weights, gradients, optimizer state and
    activations; the first stage holds the most micro-batches in flight, the last the logits).
    impl: "megatron" (Korthikanti's count for Megatron-LM 2021 kernels) or "trident" (trident_layer).
    micro_batches: per pipeline and step (fewer than pp keep fewer in flight); None: at least pp."""
    stages = [(True, True)] if lay.pp == 1 else [(True, False), (False, True)]
    return max((_stage_bytes(shape, lay, f, l, precision, impl, micro_batches) for f, l in stages), key=lambda m: m["total"])


def _ring(bytes_: float, n: int, gbps: float, lat: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * bytes_ / (gbps * 1e9) + lat


def predict(shape: Shape, lay: Layout, batch: int, gpu: GPU, precision: str = "bf16",
            cal: Calibration = MEGATRON_2021, forward_only: bool = False) -> dict:
    """One step over `batch` sequences; forward_only: a scoring pass (one forward, no gradients)."""
    t, p, d, b, v = lay.tp, lay.pp, lay.dp, lay.micro_batch, lay.vp
    n = t * p * d
    m = batch // (d * b)
    peak = (gpu.fp8_tflops if precision == "fp8" and gpu.fp8_tflops else gpu.bf16_tflops) * 1e12
    if forward_only:
        lay = replace(lay, recompute="none")
    hw, model = step_flops(shape, batch, lay.recompute)
    if forward_only:
        hw, model = hw / 3, model / 3
    s, h = shape.seq, shape.hidden
    passes = 1 if forward_only else {"none": 3, "selective": 3, "full": 4}[lay.recompute]
    score_passes = passes + (1 if lay.recompute == "selective" else 0)
    mem_s = (cal.score_bytes * b * (shape.heads / t) * s * s * score_passes
             + cal.elem_bytes * b * s * h * passes) / (gpu.hbm_tbps * 1e12)
    gemm_hw = hw
    if cal.nongemm_layer_s:  # measured non-GEMM time (a forward is a third of forward + backward)
        gemm_hw = hw - batch * shape.layers * 4 * s * s * h * score_passes
        if forward_only and cal.nongemm_layer_fwd_s:
            mem_s = (cal.nongemm_layer_fwd_s + cal.nongemm_head_fwd_s / shape.layers) * b * s / t
        else:
            mem_s = (cal.nongemm_layer_s + cal.nongemm_head_s / shape.layers) * b * s / t * passes / 3
    per_mb_layer = gemm_hw / batch * b / shape.layers / t / (peak * cal.gemm_eff) + mem_s
    msg = b * s * h * 2
    # 2 all-reduces per layer in each forward (the recomputed one too) and in the backward
    reduces = 2 if forward_only else 2 * (passes - 1)
    tp_s = reduces * _ring(msg, t, gpu.nvlink_gbps, cal.latency_s) if t > 1 else 0.0
    per_mb_stage = (per_mb_layer + tp_s) * shape.layers / p
    pipe_s = pipeline_s(per_mb_stage, m, p, v)
    net = gpu.net_gbps if n > gpu.per_node else gpu.nvlink_gbps
    p2p_s = 0.0 if p == 1 else (1 if forward_only else 2) * m * (msg / (t if cal.p2p_scatter else 1)) / (net * 1e9)
    stage_params = shape.params / (t * p)
    dp_s = 0.0 if forward_only else _ring(stage_params * cal.grad_comm_bytes, d, net, cal.latency_s) * (1 - cal.dp_overlap)
    opt_s = 0.0
    if cal.optimizer_pass and not forward_only:
        opt_s = stage_params / (d if lay.zero else 1) * OPTIMIZER_BYTES[precision] / (gpu.hbm_tbps * 1e12)
    step = pipe_s + p2p_s + dp_s + opt_s
    mem = memory_bytes(shape, lay, precision, cal.activations, m)
    return {"step_s": step, "tflops_per_gpu": hw / n / step / 1e12, "mfu": model / n / step / peak,
            "tokens_per_s": batch * s / step, "bubble": (p - 1) / (v * m), "memory_gib_per_gpu":
            {k: round(x / 2**30, 2) for k, x in mem.items()},
            "fits": mem["total"] <= 0.95 * gpu.hbm_gib * 2**30,
            "time_s": {"compute_and_tp": round(pipe_s, 4), "tp_comm": round(tp_s * shape.layers / p * m, 4),
                       "pp_p2p": round(p2p_s, 4), "dp_comm": round(dp_s, 4),
                       "optimizer": round(opt_s, 4)},
            "layout": asdict(lay)}


def pipeline_s(per_mb_stage_s: float, m: int, p: int, v: int = 1) -> float:
    """Busy time m t plus the 1F1B bubble (p - 1) t / v (interleaved over v chunks per rank)."""
    return per_mb_stage_s * m * (1 + (p - 1) / (v * m))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_layout(shape: Shape, lay: Layout, batch: int, gpus: int, gpu: GPU) -> None:
    """One-line errors for a layout that cannot run."""
    if shape.heads % lay.tp or shape.kv_heads % lay.tp and lay.tp % shape.kv_heads:
        raise ConfigError(f"tp {lay.tp} does not divide the {shape.heads} heads / {shape.kv_heads} KV heads")
    if gpu.per_node % lay.tp:
        raise ConfigError(f"tp {lay.tp} does not divide a node ({gpu.per_node} GPUs per {gpu.name} node)")
    if shape.layers % (lay.pp * lay.vp):
        raise ConfigError(f"pp {lay.pp} x vp {lay.vp} does not divide the {shape.layers} layers")
    if gpus % (lay.tp * lay.pp) or lay.tp * lay.pp * lay.dp != gpus:
        raise ConfigError(f"tp {lay.tp} x pp {lay.pp} does not divide --gpus {gpus}")
    if batch % (lay.dp * lay.micro_batch):
        raise ConfigError(f"global batch {batch} does not divide by dp {lay.dp} x micro-batch {lay.micro_batch}")
    if lay.vp > 1 and (batch // (lay.dp * lay.micro_batch)) % lay.pp:
        raise ConfigError("interleaving needs micro-batches per pipeline divisible by pp")


def search(shape: Shape, batch: int, gpus: int, gpu: GPU, precision: str = "bf16",
           cal: Calibration = MEGATRON_2021, fixed: dict | None = None) -> list[dict]:
    """Every valid layout (TP within a node) that fits, fastest first; `fixed` pins fields of Layout."""
    fixed = fixed or {}
    out, smallest = [], None
    for tp in [k for k in _divisors(gpus) if gpu.per_node % k == 0]:
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            for mb in [k for k in _divisors(batch // dp) if k <= 64] if batch % dp == 0 else []:
                for vp in [k for k in _divisors(shape.layers // pp) if k <= 8] if shape.layers % pp == 0 else []:
                    for rc in ("none", "selective", "full"):
                        for zero in (0, 1):
                            lay = Layout(tp, pp, dp, mb, vp, rc, zero, sp=tp > 1)
                            lay = replace(lay, **fixed)
                            try:
                                check_layout(shape, lay, batch, gpus, gpu)
                            except ConfigError:
                                continue
                            res = predict(shape, lay, batch, gpu, precision, cal)
                            total = res["memory_gib_per_gpu"]["total"]
                            smallest = total if smallest is None else min(smallest, total)
                            if res["fits"]:
                                out.append(res)
    if not out:
        if smallest is None:
            raise ConfigError(f"no layout of {gpus} GPUs divides this model and batch (heads, layers, batch)")
        raise ConfigError(f"the model fits no layout on {gpus} x {gpu.name}: the smallest needs {smallest:.1f} GiB "
                          f"per GPU, {smallest - 0.95 * gpu.hbm_gib:.1f} GiB over {0.95 * gpu.hbm_gib:.1f}")
    unique = {tuple(sorted(r["layout"].items())): r for r in out}
    return sorted(unique.values(), key=lambda r: (round(r["step_s"], 6), r["memory_gib_per_gpu"]["total"]))


def calibrate(rows: list[dict], gpu: GPU) -> tuple[Calibration, float]:
    """Fit gemm_eff and score_bytes to published runs (dicts with shape, layout, batch, tflops) by
    minimising the worst relative error of the predicted TFLOP/s per GPU; returns (fit, that error)."""
    best = None
    for eff in [x / 100 for x in range(40, 96)]:
        for score in [x / 2 for x in range(0, 33)]:
            cal = replace(MEGATRON_2021, gemm_eff=eff, score_bytes=score)
            err = max(abs(predict(r["shape"], r["layout"], r["batch"], gpu, "bf16", cal)["tflops_per_gpu"]
                          / r["tflops"] - 1) for r in rows)
            if best is None or err < best[1]:
                best = (cal, err)
    return best
