"""A model of one PPO step for `trident plan ppo`: generation on vLLM engines, the weight sync into
them, scoring (the actor's old log-probs, the reference, the reward model) and the actor + critic
update, for N GPUs split between generation and training (separate) or shared by both (colocated).

Generation, per engine of tp_g GPUs (OpenRLHF / veRL's engine layout):
  prefill  compute-bound: 2 P b L_p + 2 L_p^2 h l b FLOPs (causal attention) at `gemm_eff` of peak;
  decode   each of the R steps costs max(compute, bytes / (HBM bandwidth x `bw_eff`)) + `step_s`,
           where bytes are the weights (P e / tp_g) and the KV cache read at the mean context
           (L_p + R / 2), and `step_s` is the engine's fixed cost per step (scheduler, sampler,
           launches; TP all-reduce latency is added per layer).
  The KV cache holds what `kv_util` of HBM leaves after the weights (and, colocated, after the
  training models' resident state); more sequences than fit run in waves.
Weight sync: every engine GPU receives its 1/tp_g of the actor's 16-bit weights; each training rank
  sends only the slices it owns (trident's plan, parallel/reshard.py), so a link carries at most
  max(P e / tp_g, E P e / (tp pp)) bytes: NVLink when the engines share the node, the inter-node
  fabric otherwise; plus `sync_fixed_s` (RPC and reload).
Scoring and the update use tools/perf_model.predict on the training layout: forward passes of the
  reference, reward model and (old_logprobs recompute) the actor, and the critic unless its values come
  from its first update pass (fused_values: one epoch, one minibatch, no pipeline); then epochs x
  minibatches optimizer steps of actor and critic. In the shared actor + critic schedule both models'
  micro-batches run in one pipeline; with a bubble proportional to the per-micro-batch time, that
  costs what the two pipelines cost one after the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.errors import ConfigError
from tools.perf_model import GPU, MEGATRON_2021, Calibration, Layout, Shape, check_layout, memory_bytes, predict


@dataclass(frozen=True)
class PPOJob:
    actor: Shape
    """The policy (and reference); its `seq` is prompt_len + response_len."""
    critic: Shape
    reward: Shape
    rollouts: int
    """Sequences generated per step (prompts x samples per prompt)."""
    prompt_len: int
    response_len: int
    epochs: int = 1
    minibatches: int = 1
    old_logprobs: str = "recompute"
    """recompute: the actor scores the rollout again; rollout: the engine's log-probs are used."""
    fused_values: bool = True
    """The critic's values come from its first update pass (when epochs = minibatches = 1, pp = 1)."""


@dataclass(frozen=True)
class EngineCalibration:
    gemm_eff: float = 0.6
    """Share of the peak the engine's prefill GEMMs reach."""
    decode_gemm_eff: float = 0.5
    """Share of the peak a decode step's GEMMs reach (a few rows per sequence batch)."""
    bw_eff: float = 0.8
    """Share of HBM bandwidth a decode step's weight and KV reads reach."""
    step_s: float = 0.004
    """Fixed engine cost per decode step (scheduler, sampler, kernel launches; CUDA graphs on GPUs)."""
    sync_fixed_s: float = 0.05
    """Fixed cost per weight sync (RPC, reload bookkeeping)."""
    kv_util: float = 0.9
    """Share of HBM the engine may use (vLLM's gpu_memory_utilization)."""
    latency_s: float = 5e-6
    """Per-collective latency of the engine's TP all-reduces."""


def _kv_bytes_per_token(s: Shape, e: int = 2) -> float:
    return 2 * s.layers * s.kv_heads * (s.hidden // s.heads) * e


def engine_weight_bytes(s: Shape, tp_g: int, weight_bytes: int = 2) -> float:
    return (s.layers * s.layer_matmul_params + s.hidden * s.vocab) * weight_bytes / tp_g


def generation_flops(job: PPOJob, b: int) -> tuple[float, float]:
    """(prefill FLOPs, FLOPs of one decode step at the mean context) for b sequences at once."""
    s, lp = job.actor, job.prompt_len
    head, ctx = s.hidden * s.vocab, lp + job.response_len / 2
    prefill = 2 * s.layers * s.layer_matmul_params * b * lp + 2 * lp * lp * s.hidden * s.layers * b + 2 * head * b
    return prefill, (2 * (s.layers * s.layer_matmul_params + head) + 4 * ctx * s.hidden * s.layers) * b


def generation(job: PPOJob, tp_g: int, engines: int, gpu: GPU, cal: EngineCalibration,
               resident_gib: float = 0.0, weight_bytes: int = 2) -> dict:
    """Seconds to generate the step's rollouts on `engines` engines of tp_g GPUs each; resident_gib:
    what else stays on each GPU meanwhile (colocated: the training models' weights and optimizer)."""
    s, lp, r = job.actor, job.prompt_len, job.response_len
    peak = gpu.bf16_tflops * 1e12 * cal.gemm_eff
    weights = engine_weight_bytes(s, tp_g, weight_bytes)
    free = cal.kv_util * gpu.hbm_gib * 2**30 - weights - resident_gib * 2**30
    per_seq = _kv_bytes_per_token(s) / tp_g * (lp + r)
    if free < per_seq:
        raise ConfigError(f"generation: {tp_g} GPU(s) per engine leave no room for the KV cache "
                          f"({free / 2**30:.1f} GiB free)")
    per_engine = math.ceil(job.rollouts / engines)
    waves = math.ceil(per_engine / int(free // per_seq))
    b = math.ceil(per_engine / waves)
    prefill_flops, step_flops = generation_flops(job, b)
    prefill = prefill_flops / (tp_g * peak)
    ctx = lp + r / 2
    flops = step_flops / (tp_g * gpu.bf16_tflops * 1e12 * cal.decode_gemm_eff)
    reads = (weights + _kv_bytes_per_token(s) / tp_g * ctx * b) / (gpu.hbm_tbps * 1e12 * cal.bw_eff)
    tp_lat = 2 * s.layers * cal.latency_s if tp_g > 1 else 0.0
    step = max(flops, reads) + tp_lat + cal.step_s
    return {"gen_s": waves * (prefill + r * step), "prefill_s": waves * prefill, "decode_step_s": step,
            "decode_bound": "memory" if reads > flops else "compute", "waves": waves, "batch_per_engine": b}


def sync(job: PPOJob, lay: Layout, tp_g: int, engines: int, gpu: GPU, cal: EngineCalibration,
         same_node: bool, weight_bytes: int = 2) -> float:
    """Seconds to place the actor's new weights in every engine (each byte sent once by its owner)."""
    total = job.actor.params * weight_bytes
    per_link = max(total / tp_g, engines * total / (lay.tp * lay.pp))
    bw = gpu.nvlink_gbps if same_node else gpu.net_gbps
    return per_link / (bw * 1e9) + cal.sync_fixed_s


def training(job: PPOJob, lay: Layout, gpu: GPU, precision: str = "bf16", cal: Calibration = MEGATRON_2021) -> dict:
    """Scoring and update seconds, and per-GPU GiB of the four models, on one training layout."""
    a = replace(job.actor, seq=job.prompt_len + job.response_len)
    c = replace(job.critic, seq=a.seq)
    rm = replace(job.reward, seq=a.seq)
    n = job.rollouts

    def fwd(shape):
        return predict(shape, lay, n, gpu, precision, cal, forward_only=True)["step_s"]

    fused = job.fused_values and job.epochs == 1 and job.minibatches == 1 and lay.pp == 1
    actor_fwd = fwd(a)  # the reference, and the actor's old log-probs when recomputed
    score = actor_fwd * (2 if job.old_logprobs == "recompute" else 1) + fwd(rm) + (0.0 if fused else fwd(c))
    per_minibatch = n // job.minibatches
    steps = job.epochs * job.minibatches
    train = steps * sum(predict(sh, lay, per_minibatch, gpu, precision, cal)["step_s"] for sh in (a, c))
    m = per_minibatch // (lay.dp * lay.micro_batch)
    frozen = sum(sh.params for sh in (a, rm)) * 2 / (lay.tp * lay.pp)  # reference + reward: 16-bit weights
    ma, mc = (memory_bytes(sh, lay, precision, cal.activations, m) for sh in (a, c))
    mem = {k: ma[k] + mc[k] for k in ("weights", "grads", "optimizer", "activations")}
    resident = (mem["weights"] + mem["grads"] + mem["optimizer"] + frozen) / 2**30
    return {"score_s": score, "train_s": train, "memory_gib": (sum(mem.values()) + frozen) / 2**30,
            "resident_gib": resident}


def _layouts(job: PPOJob, gpus: int, gpu: GPU, fixed: dict):
    per_minibatch = job.rollouts // job.minibatches
    for tp in [k for k in (1, 2, 4, 8) if gpus % k == 0 and gpu.per_node % k == 0]:
        for pp in [k for k in range(1, gpus // tp + 1) if (gpus // tp) % k == 0]:
            dp = gpus // (tp * pp)
            if per_minibatch % dp:
                continue
            for mb in [k for k in (1, 2, 4, 8, 16) if (per_minibatch // dp) % k == 0]:
                for rc in ("none", "full"):
                    lay = replace(Layout(tp, pp, dp, mb, 1, rc, 1, sp=tp > 1), **fixed)
                    try:
                        check_layout(job.actor, lay, per_minibatch, gpus, gpu)
                    except ConfigError:
                        continue
                    yield lay


def plan_ppo(job: PPOJob, gpus: int, gpu: GPU, precision: str = "bf16", cal: Calibration = MEGATRON_2021,
             ecal: EngineCalibration = EngineCalibration(), placement: str | None = None,
             fixed: dict | None = None) -> list[dict]:
    """Every feasible (placement, generation GPUs, engine TP, training layout), fastest step first.
    colocated: all GPUs generate, then all train; separate: G GPUs generate and N - G train (whole
    nodes each once the job spans nodes), one after the other (synchronous PPO)."""
    fixed, out, best_train, smallest = fixed or {}, [], {}, []
    hbm = 0.95 * gpu.hbm_gib

    def best_training(n: int):
        if n not in best_train:
            tried = [(lay, training(job, lay, gpu, precision, cal)) for lay in _layouts(job, n, gpu, fixed)]
            smallest.extend(t["memory_gib"] for _, t in tried)
            fits = [(lay, t) for lay, t in tried if t["memory_gib"] <= hbm]
            best_train[n] = min(fits, key=lambda x: x[1]["score_s"] + x[1]["train_s"]) if fits else None
        return best_train[n]

    unit = gpu.per_node if gpus > gpu.per_node else 1
    splits = [] if placement == "colocated" else [(g, gpus - g) for g in range(unit, gpus, unit)]
    options = ([("colocated", gpus, gpus)] if placement != "separate" else []) + [("separate", g, t) for g, t in splits]
    for mode, gen_gpus, train_gpus in options:
        found = best_training(train_gpus)
        if found is None:
            continue
        lay, t = found
        for tp_g in [k for k in (1, 2, 4, 8) if gen_gpus % k == 0 and gpu.per_node % k == 0
                     and (job.actor.kv_heads % k == 0 or k % job.actor.kv_heads == 0)]:
            engines = gen_gpus // tp_g
            # colocated engines sleep during training (their KV cache freed, as vLLM's sleep mode
            # does for OpenRLHF / veRL), so training shares HBM with the engine's weights only
            if mode == "colocated" and t["memory_gib"] + engine_weight_bytes(job.actor, tp_g) / 2**30 > hbm:
                continue
            try:
                g = generation(job, tp_g, engines, gpu, ecal, t["resident_gib"] if mode == "colocated" else 0.0)
            except ConfigError:
                continue
            same_node = mode == "colocated" or gpus <= gpu.per_node
            sy = sync(job, lay, tp_g, engines, gpu, ecal, same_node)
            step = g["gen_s"] + sy + t["score_s"] + t["train_s"]
            # separate engines with rollout.async generate step k + 1 while step k trains (policy lag
            # 1), and the new weights travel from the update's end while they still generate
            # (rollout.transfer_ahead): only the reload's fixed cost stays on the step's path
            overlapped = (max(g["gen_s"], t["score_s"] + t["train_s"] + sy - ecal.sync_fixed_s) + ecal.sync_fixed_s
                          if mode == "separate" else step)
            out.append({"placement": mode, "gen_gpus": gen_gpus, "train_gpus": train_gpus, "engine_tp": tp_g,
                        "engines": engines, "train_layout": {k: getattr(lay, k) for k in
                                                             ("tp", "pp", "dp", "micro_batch", "recompute", "zero")},
                        "gen_s": g["gen_s"], "sync_s": sy, "score_s": t["score_s"], "train_s": t["train_s"],
                        "step_s": step, "overlapped_step_s": overlapped, "decode_bound": g["decode_bound"], "waves": g["waves"],
                        "train_memory_gib": t["memory_gib"],
                        "tokens_per_s": job.rollouts * (job.prompt_len + job.response_len) / step})
    if not out:
        if not smallest:
            raise ConfigError(f"no training layout of {gpus} GPUs divides this model and {job.rollouts} rollouts")
        least = min(smallest)
        raise ConfigError(f"the four models fit no placement on {gpus} x {gpu.name}: the smallest training layout "
                          f"needs {least:.1f} GiB per GPU, {max(least - hbm, 0):.1f} GiB over {hbm:.1f} "
                          f"(plus the engine's weights and KV cache)")
    return sorted(out, key=lambda r: r["step_s"])
