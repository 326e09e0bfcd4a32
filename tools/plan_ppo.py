"""`trident plan ppo`: how to split N GPUs between generation and training for PPO, and what one step
costs by phase (tools/perf_rlhf.py), without launching anything.

  trident plan ppo --hf-config actor.json --reward-hf-config rm.json --gpus 64 --gpu h100-sxm \\
      --rollouts 1024 --prompt-len 1024 --response-len 1024
  trident plan ppo --calibrate        # the model against `trident bench ppo --size L` on this machine

Prints the best placements as a table, then one JSON line: placement, GPUs generating and training,
engine TP, training layout, seconds per phase and per step, and why it won.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace

from engine.errors import ConfigError, TridentError
from tools.perf_model import GPU, MEGATRON_2021, Calibration, Layout, Shape
from tools.perf_rlhf import (EngineCalibration, PPOJob, engine_weight_bytes, generation, generation_flops, plan_ppo,
                              sync, training)
from tools.plan import add_model_and_gpu_args, check_positive, gpu_from_args, hf_shape, model_shape


def parse(argv):
    p = argparse.ArgumentParser(prog="trident plan ppo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    add_model_and_gpu_args(p)
    p.add_argument("--critic-hf-config", help="the critic's config.json (default: the actor's shape)")
    p.add_argument("--reward-hf-config", help="the reward model's config.json (default: the actor's shape)")
    p.add_argument("--rollouts", type=int, help="sequences generated per step (prompts x samples)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--old-logprobs", default="recompute", choices=["recompute", "rollout"])
    p.add_argument("--placement", choices=["colocated", "separate"], help="fix the placement (default: both)")
    p.add_argument("--step-overhead-ms", type=float, help="the engine's fixed cost per decode step (default 4)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--calibrate", action="store_true", help="measure this machine and predict bench ppo --size L")
    return p.parse_args(argv)


def _fmt(r: dict) -> str:
    t = r["train_layout"]
    return (f"{r['placement']:<10}{r['gen_gpus']:>5}{r['train_gpus']:>6}  tp{r['engine_tp']} x{r['engines']:<4}"
            f"tp{t['tp']} pp{t['pp']} dp{t['dp']} mb{t['micro_batch']} {t['recompute']:<5}")


def why(best: dict, ranked: list[dict]) -> str:
    parts = [f"decode is {best['decode_bound']}-bound", f"generation {best['gen_s'] / best['step_s']:.0%} of the step",
             f"training GPUs hold {best['train_memory_gib']:.1f} GiB"]
    other = next((r for r in ranked if r["placement"] != best["placement"]), None)
    if other:
        parts.append(f"{other['step_s'] / best['step_s'] - 1:.0%} faster than the best {other['placement']} "
                     f"({other['gen_gpus']} generating, {other['train_gpus']} training)")
    return "; ".join(parts)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.calibrate:
        from tools.bench import print_report
        res = calibrate()
        return print_report(report(res), res)
    try:
        if args.gpus is None or args.rollouts is None:
            raise ConfigError("give --gpus and --rollouts (or --calibrate)")
        check_positive(args, ("gpus", "rollouts", "prompt_len", "response_len", "epochs", "minibatches", "top",
                              "hidden", "layers", "heads", "kv_heads", "ffn", "vocab"))
        if args.rollouts % args.minibatches:
            raise ConfigError(f"--rollouts {args.rollouts} does not divide into {args.minibatches} minibatches")
        if args.step_overhead_ms is not None and args.step_overhead_ms < 0:
            raise ConfigError(f"--step-overhead-ms must be >= 0, got {args.step_overhead_ms}")
        gpu = gpu_from_args(args)
        seq = args.prompt_len + args.response_len
        actor = model_shape(args, seq)
        critic = hf_shape(args.critic_hf_config, seq) if args.critic_hf_config else actor
        reward = hf_shape(args.reward_hf_config, seq) if args.reward_hf_config else actor
        job = PPOJob(actor, critic, reward, args.rollouts, args.prompt_len, args.response_len, args.epochs,
                     args.minibatches, args.old_logprobs)
        ecal = EngineCalibration()
        if args.step_overhead_ms is not None:
            ecal = replace(ecal, step_s=args.step_overhead_ms / 1000)
        ranked = plan_ppo(job, args.gpus, gpu, args.precision, MEGATRON_2021, ecal, args.placement)
    except TridentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"PPO on {args.gpus} x {gpu.name}: actor {actor.params / 1e9:.2f} B, critic {critic.params / 1e9:.2f} B, "
          f"reward {reward.params / 1e9:.2f} B; {args.rollouts} rollouts of {args.prompt_len} + {args.response_len} tokens")
    print(f"{'placement':<10}{'gen':>5}{'train':>6}  {'engines':<9}{'training layout':<22}"
          f"{'gen s':>8}{'sync s':>8}{'score s':>9}{'train s':>9}{'step s':>9}")
    for r in ranked[:args.top]:
        print(f"{_fmt(r):<52}{r['gen_s']:>8.2f}{r['sync_s']:>8.2f}{r['score_s']:>9.2f}{r['train_s']:>9.2f}"
              f"{r['step_s']:>9.2f}")
    out = dict(ranked[0])
    out["why"] = why(ranked[0], ranked[1:])
    print(json.dumps(out))
    return 0


# ---- calibration: the model against `bench ppo --size L` on this machine ---------------------------

def _bench_ppo(size: str, steps: int) -> dict:
    """The fastest of `steps` timed steps, per phase, of one `trident bench ppo` run in its own process
    (its vLLM engine comes and goes with it). Generation times of the small probes vary by up to 50%
    from step to step here; the fastest is the least disturbed."""
    cmd = [sys.executable, "-m", "tools.bench", "ppo", "--size", size, "--steps", str(steps), "--warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["fastest"]


def _job(size) -> PPOJob:
    from tools.bench_ppo import VOCAB
    s = Shape(size.hidden, size.layers, size.heads, size.heads, size.ffn, VOCAB, size.prompt_len + size.response)
    return PPOJob(s, s, s, size.prompts, size.prompt_len, size.response)


def _training_calibration(job: PPOJob, dtype, cpu: GPU) -> tuple[Calibration, dict]:
    """The planner's training constants measured at this job's shape on `cpu`: the share of the peak
    its training GEMMs reach and its non-GEMM kernels' time per token (with and without gradients)."""
    from tools.plan_calibrate import gemm_share, nongemm_s

    a = job.actor
    share = gemm_share(a, job.rollouts, cpu.bf16_tflops, dtype)
    (layer_s, head_s), (layer_f, head_f) = (nongemm_s(a, job.rollouts, dtype, forward_only=f) for f in (False, True))
    tcal = replace(MEGATRON_2021, gemm_eff=share, nongemm_layer_s=layer_s, nongemm_head_s=head_s,
                   nongemm_layer_fwd_s=layer_f, nongemm_head_fwd_s=head_f, grad_comm_bytes=4.0, optimizer_pass=True)
    consts = {"gemm_share": share, "nongemm_us_per_token": {k: round(1e6 * v, 2) for k, v in (
        ("layer", layer_s), ("head", head_s), ("layer_forward", layer_f), ("head_forward", head_f))}}
    return tcal, consts


def _counted(job: PPOJob, cpu: GPU, tcal: Calibration) -> dict:
    """Scoring and training seconds of bench ppo at this job's shape as the planner counts them."""
    phases = training(job, Layout(1, 1, 1, job.rollouts), cpu, "bf16", tcal)
    return {k: phases[k] for k in TRAINING_PHASES}


TRAINING_PHASES = ("score_s", "train_s")


def _engine_calibration(shallow: PPOJob, deep: PPOJob, ms: dict, md: dict, peak: float, mem_gbps: float):
    """The engine's cost per FLOP and per decode step from two probes that differ only in depth: the
    extra generation time of the deeper one over its extra FLOPs, and what that rate leaves of the
    shallower one's time per decode step; the sync's fixed cost is the shallow probe's beyond its bytes.
    Depth, not width: every layer is the same work, so time is linear in depth. Along width it is not
    here: at a quarter and a half of L's width vLLM's decode GEMMs cost the same (0.73 ms per step,
    latency-bound; torch profiler), so a rate fitted across widths does not extrapolate."""
    def total(job):
        pre, step = generation_flops(job, job.rollouts)
        return pre + job.response_len * step
    rate = (total(deep) - total(shallow)) / max(md["gen_s"] - ms["gen_s"], 1e-9)
    step_s = max(0.0, (ms["gen_s"] - total(shallow) / rate) / shallow.response_len)
    sync_fixed = max(0.0, ms["sync_s"] - shallow.actor.params * 2 / (mem_gbps * 1e9))
    eff = rate / (peak * 1e12)
    return EngineCalibration(gemm_eff=eff, decode_gemm_eff=eff, bw_eff=1.0, step_s=step_s, sync_fixed_s=sync_fixed)


def calibrate() -> dict:
    """Measure this machine (the matmul peak in the dtype bench ppo's GEMMs run, memcpy bandwidth) and
    run `bench ppo --size L-d2` and `L-d4` (L's width, batch and lengths at a quarter and a half of
    its depth; each twice, interleaved, the fastest kept). The engine's cost per FLOP and per decode
    step come from the two probes (_engine_calibration). Scoring and training are the planner's count
    (L's own GEMM share and non-GEMM kernel times, measured) in seconds of these runs: one factor per
    phase, fitted to the probes' difference, turns counted into measured seconds, and what the count
    leaves out (Python, the PPO math) is L-d2's measured beyond that. Every term of the count the
    probes differ in is per layer, so along depth this is the probes' linear extrapolation; the
    factor says how far the count's absolute seconds are off here (`trident plan --calibrate` checks
    the count itself against bench train). Then predict `bench ppo --size L` phase by phase against
    its run. No timing is rescaled: a matmul-speed sample taken before each run (the shared host
    drifts) once read half the speed the L run then had."""
    import torch

    from kernels.matmul import native_low_precision_gemm
    from tools.bench_ppo import SIZES
    from tools.bench_train import MatmulPeak
    from tools.plan_calibrate import memcpy_gbps

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if native_low_precision_gemm(torch.bfloat16) else torch.float32
    mem = memcpy_gbps()
    peak = MatmulPeak(dtype, 1024, torch.device("cpu"))
    peak.sample(20)
    # each probe twice, interleaved, in fresh processes: one vLLM process can run 40% slower than the next
    runs = [(name, _bench_ppo(name, steps)) for name, steps in (("L-d2", 8), ("L-d4", 8), ("L-d2", 8),
                                                                ("L-d4", 8), ("L", 5))]
    measured = runs[-1][1]

    def fastest(name):
        mine = [m for n, m in runs if n == name]
        return {k: min(m[k] for m in mine) for k in mine[0]}

    ms, md = fastest("L-d2"), fastest("L-d4")
    cpu = GPU("this-machine", peak.best, 0, 24, mem / 1000, mem, mem, per_node=1)
    shallow, deep, job = _job(SIZES["L-d2"]), _job(SIZES["L-d4"]), _job(SIZES["L"])
    ecal = _engine_calibration(shallow, deep, ms, md, peak.best, mem)
    tcal, consts = _training_calibration(job, dtype, cpu)  # the probes' layers are L's: one set of constants
    cs, cd, cl = (_counted(j, cpu, tcal) for j in (shallow, deep, job))
    factor = {k: (md[k] - ms[k]) / (cd[k] - cs[k]) for k in TRAINING_PHASES}
    left = {k: ms[k] - factor[k] * cs[k] for k in TRAINING_PHASES}
    pred = {"gen_s": generation(job, 1, 1, cpu, ecal)["gen_s"],
            "sync_s": sync(job, Layout(1, 1, 1, job.rollouts), 1, 1, cpu, ecal, True),
            **{k: factor[k] * cl[k] + left[k] for k in TRAINING_PHASES}}
    rows = [{"phase": k, "predicted_s": pred[k], "measured_s": measured[k], "error": pred[k] / measured[k] - 1,
             "d2_s": ms[k], "d4_s": md[k]} for k in ("gen_s", "sync_s", "score_s", "train_s")]
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "peak_tflops": peak.best, "memcpy_gbps": mem,
            **consts, "measured_over_counted": factor,
            "engine": {"flop_share": ecal.gemm_eff, "step_ms": 1000 * ecal.step_s,
                       "sync_fixed_ms": 1000 * ecal.sync_fixed_s},
            "not_counted_s": left, "engine_weights_mb": engine_weight_bytes(job.actor, 1) / 1e6, "rows": rows,
            "max_error_gen_score_train": max(abs(r["error"]) for r in rows if r["phase"] != "sync_s")}


def report(res: dict) -> list[str]:
    ng, en, left = res["nongemm_us_per_token"], res["engine"], res["not_counted_s"]
    lines = [f"this machine: {res['matmul_dtype']} matmul peak {res['peak_tflops']:.3f} TFLOP/s, memcpy "
             f"{res['memcpy_gbps']:.1f} GB/s; L's training GEMMs reach {res['gemm_share']:.2f} of the peak, its "
             f"non-GEMM kernels {ng['layer']:.1f} us per token and layer ({ng['layer_forward']:.1f} forward only)",
             f"vLLM engine (L-d2, L-d4): {en['flop_share']:.2f} of the peak per FLOP, {en['step_ms']:.1f} ms "
             f"per decode step, sync {en['sync_fixed_ms']:.1f} ms beyond its bytes; not counted (L-d2): "
             f"scoring {left['score_s']:+.2f} s, training {left['train_s']:+.2f} s; measured / counted: scoring "
             f"{res['measured_over_counted']['score_s']:.2f}, training {res['measured_over_counted']['train_s']:.2f}",
             f"bench ppo --size L   {'predicted':>10}{'measured':>10}{'error':>8}   (L-d2, L-d4 measured)"]
    for r in res["rows"]:
        lines.append(f"{r['phase']:<21}{r['predicted_s']:>9.3f}s{r['measured_s']:>9.3f}s{r['error']:>+8.1%}"
                     f"   ({r['d2_s']:.3f}s, {r['d4_s']:.3f}s)")
    return lines
