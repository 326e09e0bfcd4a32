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
from tools.perf_model import GPU, MEGATRON_2021, Layout, Shape
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


def _speed(dtype) -> float:
    """This machine's matmul TFLOP/s now (best of 20 1024^3 GEMMs): the shared host's speed drifts by
    up to 25% between runs here, so every timing is scaled to the speed during the L run."""
    import torch

    from tools.bench_train import MatmulPeak
    peak = MatmulPeak(dtype, 1024, torch.device("cpu"))
    peak.sample(20)
    return peak.best


def _counted(job: PPOJob, dtype, cpu: GPU, ecal: EngineCalibration) -> tuple[dict, dict]:
    """Phase seconds of bench ppo at this job's shape as the planner counts them on `cpu`, and the
    constants measured for the count: the share of the peak the job's training GEMMs reach and its
    non-GEMM kernels' time per token (with and without gradients), at the speed cpu.bf16_tflops."""
    from tools.plan_calibrate import gemm_share, nongemm_s

    a = job.actor
    now = _speed(dtype)
    share = gemm_share(a, job.rollouts, now, dtype)
    at = now / cpu.bf16_tflops  # kernel seconds measured now, at cpu's speed
    (layer_s, head_s), (layer_f, head_f) = ([x * at for x in nongemm_s(a, job.rollouts, dtype, forward_only=f)]
                                            for f in (False, True))
    tcal = replace(MEGATRON_2021, gemm_eff=share, nongemm_layer_s=layer_s, nongemm_head_s=head_s,
                   nongemm_layer_fwd_s=layer_f, nongemm_head_fwd_s=head_f, grad_comm_bytes=4.0, optimizer_pass=True)
    lay = Layout(1, 1, 1, job.rollouts)
    phases = {"gen_s": generation(job, 1, 1, cpu, ecal)["gen_s"], "sync_s": sync(job, lay, 1, 1, cpu, ecal, True),
              **{k: v for k, v in training(job, lay, cpu, "bf16", tcal).items() if k in ("score_s", "train_s")}}
    consts = {"gemm_share": share, "nongemm_us_per_token": {k: round(1e6 * v, 2) for k, v in (
        ("layer", layer_s), ("head", head_s), ("layer_forward", layer_f), ("head_forward", head_f))}}
    return phases, consts


def _engine_calibration(quarter: PPOJob, half: PPOJob, mq: dict, mh: dict, peak: float, mem_gbps: float):
    """The engine's cost per FLOP and per decode step from two probes that differ only in width: the
    extra generation time of the wider one over its extra FLOPs, and what that rate leaves of the
    narrower one's time per decode step; the sync's fixed cost is the narrow probe's beyond its bytes."""
    def total(job):
        pre, step = generation_flops(job, job.rollouts)
        return pre + job.response_len * step
    rate = (total(half) - total(quarter)) / max(mh["gen_s"] - mq["gen_s"], 1e-9)
    step_s = max(0.0, (mq["gen_s"] - total(quarter) / rate) / quarter.response_len)
    sync_fixed = max(0.0, mq["sync_s"] - quarter.actor.params * 2 / (mem_gbps * 1e9))
    eff = rate / (peak * 1e12)
    return EngineCalibration(gemm_eff=eff, decode_gemm_eff=eff, bw_eff=1.0, step_s=step_s, sync_fixed_s=sync_fixed)


def calibrate() -> dict:
    """Measure this machine: the matmul peak in the dtype bench ppo's GEMMs run, memcpy bandwidth, the
    share of the peak the job's own training GEMMs reach and its non-GEMM kernels' time. The vLLM
    engine's cost per FLOP and per decode step come from `bench ppo --size L-quarter` and `L-half` (L's
    depth, batch and lengths at a quarter and a half of its width; each run twice, the fastest
    kept). What the count of scoring and
    training leaves out (Python, the PPO math, dispatch) is L-quarter's measured minus counted time.
    Every timing is scaled to the machine's matmul speed during the L run (sampled before each
    measurement). Then predict `bench ppo --size L` phase by phase against its run."""
    import torch

    from kernels.matmul import native_low_precision_gemm
    from tools.bench_ppo import SIZES
    from tools.plan_calibrate import memcpy_gbps

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if native_low_precision_gemm(torch.bfloat16) else torch.float32
    mem = memcpy_gbps()
    # each probe twice, interleaved, in fresh processes: one vLLM process can run 40% slower than the next
    runs = []
    for name, steps in (("L-quarter", 10), ("L-half", 10), ("L-quarter", 10), ("L-half", 10), ("L", 5)):
        speed = _speed(dtype)
        runs.append((name, _bench_ppo(name, steps), speed))
    _, measured, ref = runs[-1]

    def at_ref(name):  # a probe's fastest phases over its runs, compute-bound ones at the L run's speed
        scaled = [{k: v * (speed / ref if k != "sync_s" else 1.0) for k, v in m.items()}
                  for n, m, speed in runs if n == name]
        return {k: min(r[k] for r in scaled) for k in scaled[0]}

    mq, mh = at_ref("L-quarter"), at_ref("L-half")
    cpu = GPU("this-machine", ref, 0, 24, mem / 1000, mem, mem, per_node=1)
    quarter, half, job = _job(SIZES["L-quarter"]), _job(SIZES["L-half"]), _job(SIZES["L"])
    ecal = _engine_calibration(quarter, half, mq, mh, ref, mem)
    counted_q, _ = _counted(quarter, dtype, cpu, ecal)
    left = {k: mq[k] - counted_q[k] for k in ("score_s", "train_s")}
    pred, consts = _counted(job, dtype, cpu, ecal)
    pred = {k: v + left.get(k, 0.0) for k, v in pred.items()}
    rows = [{"phase": k, "predicted_s": pred[k], "measured_s": measured[k], "error": pred[k] / measured[k] - 1,
             "quarter_s": mq[k], "half_s": mh[k]} for k in ("gen_s", "sync_s", "score_s", "train_s")]
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "peak_tflops": ref, "memcpy_gbps": mem,
            "speed_tflops_before": [(n, round(speed, 3)) for n, _, speed in runs],
            **consts, "engine": {"flop_share": ecal.gemm_eff, "step_ms": 1000 * ecal.step_s,
                                 "sync_fixed_ms": 1000 * ecal.sync_fixed_s},
            "not_counted_s": left, "engine_weights_mb": engine_weight_bytes(job.actor, 1) / 1e6, "rows": rows,
            "max_error_gen_score_train": max(abs(r["error"]) for r in rows if r["phase"] != "sync_s")}


def report(res: dict) -> list[str]:
    ng, en, left = res["nongemm_us_per_token"], res["engine"], res["not_counted_s"]
    lines = [f"this machine: {res['matmul_dtype']} matmul peak {res['peak_tflops']:.3f} TFLOP/s, memcpy "
             f"{res['memcpy_gbps']:.1f} GB/s; L's training GEMMs reach {res['gemm_share']:.2f} of the peak, its "
             f"non-GEMM kernels {ng['layer']:.1f} us per token and layer ({ng['layer_forward']:.1f} forward only)",
             f"vLLM engine (L-quarter, L-half): {en['flop_share']:.2f} of the peak per FLOP, {en['step_ms']:.1f} ms "
             f"per decode step, sync {en['sync_fixed_ms']:.1f} ms beyond its bytes; not counted (L-quarter): "
             f"scoring {left['score_s']:+.2f} s, training {left['train_s']:+.2f} s",
             "matmul speed before each run (TFLOP/s): " + ", ".join(
                 f"{n} {v:.3f}" for n, v in res["speed_tflops_before"]) + "; probes scaled to L's",
             f"bench ppo --size L   {'predicted':>10}{'measured':>10}{'error':>8}   (L-quarter, L-half measured)"]
    for r in res["rows"]:
        lines.append(f"{r['phase']:<21}{r['predicted_s']:>9.3f}s{r['measured_s']:>9.3f}s{r['error']:>+8.1%}"
                     f"   ({r['quarter_s']:.3f}s, {r['half_s']:.3f}s)")
    return lines
