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
from tools.perf_rlhf import EngineCalibration, PPOJob, engine_weight_bytes, generation, plan_ppo, sync, training
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
        res = calibrate()
        print("\n".join(report(res)))
        print(json.dumps(res))
        return 0
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

def _bench_ppo(size: str) -> dict:
    """One `trident bench ppo` run in its own process (its vLLM engine comes and goes with it)."""
    cmd = [sys.executable, "-m", "tools.bench", "ppo", "--size", size, "--steps", "2", "--warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _job(size) -> PPOJob:
    from tools.bench_ppo import VOCAB
    s = Shape(size.hidden, size.layers, size.heads, size.heads, size.ffn, VOCAB, size.prompt_len + size.response)
    return PPOJob(s, s, s, size.prompts, size.prompt_len, size.response)


def calibrate() -> dict:
    """Measure this machine (matmul peak in the dtype bench ppo's GEMMs run, memcpy bandwidth, the share
    of the peak L's own GEMMs reach at the training, prefill and decode token counts), and the engine's
    fixed costs per decode step and per sync on `bench ppo --size L-probe` (L's batch and lengths on a
    1-layer, 128-wide model, so what is left after its small compute is the engine's own cost). Then
    predict `bench ppo --size L` phase by phase and run it."""
    import torch

    from kernels.matmul import native_low_precision_gemm
    from tools.bench_ppo import SIZES
    from tools.bench_train import MatmulPeak
    from tools.plan_calibrate import gemm_share, memcpy_gbps

    torch.set_num_threads(2)
    dtype = torch.bfloat16 if native_low_precision_gemm(torch.bfloat16) else torch.float32
    mem = memcpy_gbps()
    peak = MatmulPeak(dtype, 1024, torch.device("cpu"))
    peak.sample(5)
    cpu = GPU("this-machine", peak.best, 0, 24, mem / 1000, mem, mem, per_node=1)
    job = _job(SIZES["L"])
    a = job.actor
    shares = {"train": gemm_share(a, job.rollouts, peak.best, dtype),
              "prefill": gemm_share(replace(a, seq=job.prompt_len), job.rollouts, peak.best, dtype, forward_only=True),
              "decode": gemm_share(replace(a, seq=1), job.rollouts, peak.best, dtype, forward_only=True, reps=20)}
    ecal = EngineCalibration(gemm_eff=shares["prefill"], decode_gemm_eff=shares["decode"], bw_eff=1.0,
                             step_s=0.0, sync_fixed_s=0.0)
    lay = Layout(1, 1, 1, job.rollouts)
    probe_job, probe = _job(SIZES["L-probe"]), _bench_ppo("L-probe")
    compute_only = generation(probe_job, 1, 1, cpu, ecal)
    ecal = replace(ecal, step_s=max(0.0, (probe["gen_s"] - compute_only["gen_s"]) / probe_job.response_len),
                   sync_fixed_s=max(0.0, probe["sync_s"] - sync(probe_job, lay, 1, 1, cpu, ecal, True)))
    tcal = replace(MEGATRON_2021, gemm_eff=shares["train"], score_bytes=0.0, grad_comm_bytes=4.0, optimizer_pass=True)
    pred = {"gen_s": generation(job, 1, 1, cpu, ecal)["gen_s"], "sync_s": sync(job, lay, 1, 1, cpu, ecal, True),
            **{k: v for k, v in training(job, lay, cpu, "bf16", tcal).items() if k in ("score_s", "train_s")}}
    measured = _bench_ppo("L")
    rows = [{"phase": k, "predicted_s": pred[k], "measured_s": measured[k], "error": pred[k] / measured[k] - 1}
            for k in ("gen_s", "sync_s", "score_s", "train_s")]
    return {"matmul_dtype": str(dtype).replace("torch.", ""), "peak_tflops": peak.best, "memcpy_gbps": mem,
            "gemm_share": shares, "engine_step_s": ecal.step_s, "sync_fixed_s": ecal.sync_fixed_s,
            "engine_weights_mb": engine_weight_bytes(a, 1) / 1e6, "rows": rows,
            "max_error_gen_score_train": max(abs(r["error"]) for r in rows if r["phase"] != "sync_s")}


def report(res: dict) -> list[str]:
    sh = res["gemm_share"]
    lines = [f"this machine: {res['matmul_dtype']} matmul peak {res['peak_tflops']:.3f} TFLOP/s, memcpy "
             f"{res['memcpy_gbps']:.1f} GB/s; L's GEMMs reach {sh['train']:.2f} (training), {sh['prefill']:.2f} "
             f"(prefill), {sh['decode']:.2f} (decode) of the peak; engine step {1000 * res['engine_step_s']:.1f} ms "
             f"and sync {1000 * res['sync_fixed_s']:.1f} ms beyond compute and bytes (bench ppo --size L-probe)",
             f"bench ppo --size L   {'predicted':>10}{'measured':>10}{'error':>8}"]
    for r in res["rows"]:
        lines.append(f"{r['phase']:<21}{r['predicted_s']:>9.3f}s{r['measured_s']:>9.3f}s{r['error']:>+8.1%}")
    return lines
