"""`trident bench ...`: performance measurements. Subcommands: train, ppo, pipeline, precision, memory,
checkpoint.

    python -m tools.bench train --size M --precision bf16,fp8 --compare hf [--compile]
    python -m tools.bench ppo --size L --precision bf16

Prints a human-readable summary, then, as the last line, one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.errors import ConfigError, TridentError


def _train_parser(sub) -> argparse.ArgumentParser:
    from tools.bench_train import SIZES

    p = sub.add_parser(
        "train", help="tokens/s, TFLOP/s and MFU of one training step (fwd + loss + bwd + AdamW)",
        description="Time training steps of the engine (optionally vs transformers' LlamaForCausalLM in the "
                    "same process, interleaved) and report tokens/s, model TFLOP/s (PaLM formula 6N + 12LHQT) "
                    "and MFU against a torch.mm peak measured in the same run. The last output line is one "
                    "JSON object with every number.",
        epilog="example: trident bench train --size M --precision bf16,fp8 --compare hf --compile")
    p.add_argument("--size", default="S", choices=sorted(SIZES), help="named model/batch size (default S)")
    for name, what in [("hidden", "hidden size"), ("layers", "decoder layers"), ("heads", "attention heads"),
                       ("kv-heads", "key/value heads"), ("ffn", "MLP intermediate size"), ("vocab", "vocabulary"),
                       ("seq", "sequence length"), ("batch", "sequences per step")]:
        p.add_argument(f"--{name}", type=int, help=f"override the size's {what}")
    p.add_argument("--precision", "--dtype", default="bf16", dest="precision",
                   help="engine precision(s), comma-separated: fp32, bf16, fp16, fp8 (default bf16); fp16 and fp8 "
                        "are also compared with bf16 in the same run (--dtype is the old name)")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' LlamaForCausalLM (bf16: autocast)")
    p.add_argument("--compile", action="store_true",
                   help="also time each engine with its decoder layers under torch.compile (same model and optimizer)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default auto: cuda when available)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per runner (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per runner first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--peak-n", type=int, help="matrix size of the matmul peak (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--malloc", choices=["default", "tuned"], default="tuned",
                   help="tuned (default): glibc mallopt so freed activations are reused instead of being "
                        "unmapped and page-faulted in again every step (process-wide: transformers gets it "
                        "too); default: glibc as is")
    p.add_argument("--attention", choices=["trident", "torch"], default="trident",
                   help="engine attention: trident (default) = kernels.attention as engine/model.py calls it "
                        "(fused C++ kernel for bf16, blocked kernel for long fp32 sequences); torch = torch's "
                        "F.scaled_dot_product_attention instead (patched in this process only, for A/B runs)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, torch.profiler one step of each runner and print its top N ops")
    return p


def _ppo_parser(sub) -> argparse.ArgumentParser:
    from tools.bench_ppo import SIZES

    p = sub.add_parser(
        "ppo", help="seconds per PPO step: generation, weight sync, ref/reward/value scoring, training",
        description="Run PPO steps with actor, critic and reward model Llamas of one size (random weights, "
                    "vocab 4096, random prompts, fixed-length responses, 1 epoch x 1 minibatch) and print the "
                    "median time per phase, the vLLM weight-sync overhead against its own reload_weights, and "
                    "the speed-up over TRL's PPOTrainer measured at the same settings. The last output line is "
                    "one JSON object with every number.",
        epilog="example: trident bench ppo --size L --precision bf16")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="reference setting (default tiny)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 64)")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "native"],
                   help="rollout backend (default auto: vllm when installed)")
    p.add_argument("--precision", "--dtype", default="bf16", dest="dtype", choices=["fp32", "bf16", "fp16", "fp8"],
                   help="the four models' precision policy (default bf16; --dtype is the old name)")
    p.add_argument("--old-logprobs", default="recompute", choices=["recompute", "rollout"],
                   help="old log-probs re-scored by the actor (default) or taken from the generator")
    p.add_argument("--vllm-compile", action="store_true",
                   help="let vLLM compile its model (slower start, faster decoding) instead of eager mode")
    p.add_argument("--network", action="store_true",
                   help="also time the network weight transfer (a second engine) against shared memory and reload_weights")
    p.add_argument("--vllm-cpu-reserve", type=int, default=0, metavar="N",
                   help="CPU cores vLLM's worker leaves to its scheduler (rollout.vllm_cpu_reserve; default 0)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the four models' decoder layers (parallel.compile; compiles in warmup)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    return p


def _pipeline_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pipeline", help="bubble of each pipeline schedule vs theory; shared actor+critic vs one after the other",
        description="Run the pipeline schedules on real gloo ranks with stages whose compute is a fixed sleep, "
                    "and print each schedule's measured bubble next to its theory, and the shared actor+critic "
                    "schedule's step time against the actor's and the critic's schedules run one after the other. "
                    "The last output line is one JSON object with every number.",
        epilog="example: trident bench pipeline --stages 4 --micro-batches 8")
    p.add_argument("--stages", type=int, default=4, help="pipeline stages = processes (default 4)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--forward-ms", type=float, default=200.0,
                   help="forward time per stage and micro-batch (default 200; ~1-2 ms of gloo latency per "
                        "action is the measurement's floor, so short stages overstate bubbles)")
    p.add_argument("--backward-ms", type=float, default=400.0, help="backward time per stage and micro-batch")
    p.add_argument("--virtual-stages", type=int, default=2, help="chunks per rank for interleaved (default 2)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per schedule after one warmup (default 1)")
    return p


def _precision_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "precision", help="the demo SFT at each precision against bf16 (final loss, held-out accuracy); PPO demo",
        description="Train tools/configs/demo_sft.yaml at bf16 and each given precision (same seed and data), grade "
                    "each checkpoint's greedy answers on the held-out set, and report loss and accuracy against "
                    "bf16; optionally run the PPO demo at one precision from the bf16 checkpoint. The last output "
                    "line is one JSON object with every number.",
        epilog="example: trident bench precision --precisions fp16,fp8 --ppo fp8")
    p.add_argument("--precisions", default="fp32,fp16,fp8",
                   help="comma-separated, compared with bf16 (default fp32,fp16,fp8; fp32 shows the run-to-run spread)")
    p.add_argument("--steps", type=int, help="SFT steps (default: the demo config's 1200)")
    p.add_argument("--ppo", choices=["fp32", "bf16", "fp16", "fp8"], help="also run the PPO demo at this precision")
    p.add_argument("--ppo-steps", type=int, default=150, help="PPO demo steps (default 150, the demo's)")
    p.add_argument("--seeds", type=int, default=1, help="runs per precision (seeds 0..N-1), compared by their means")
    p.add_argument("--out", default="runs/bench_precision", help="where the runs go (default runs/bench_precision)")
    return p


def _memory_parser(sub) -> argparse.ArgumentParser:
    from tools.bench_train import SIZES

    p = sub.add_parser(
        "memory", help="bytes per rank of parameters, gradients and optimizer state (DDP vs ZeRO-1)",
        description="Build the training handle at DP 1, 2 and 4 (plain DDP and optim.distributed), take one step, "
                    "and report the bytes its parameters, fp32 gradient buffer and optimizer state hold per rank, "
                    "next to Megatron's formula (bf16: 18 bytes/param, 6 + 12/dp with ZeRO-1).",
        epilog="examples: trident bench memory --size S --dp 1,2,4;  trident bench memory --peak")
    p.add_argument("--size", default="S", choices=sorted(SIZES), help="named model size (default S)")
    p.add_argument("--dp", default="1,2,4", help="data-parallel sizes, comma-separated (default 1,2,4)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="parameter precision (default bf16)")
    p.add_argument("--peak", action="store_true",
                   help="instead: peak bytes per rank of a training step at TP2, TP2+SP, PP2, DP2 and DP2+ZeRO-1, "
                        "recomputation off and on, against `trident plan`'s memory model")
    return p


def _checkpoint_parser(sub) -> argparse.ArgumentParser:
    from tools.bench_train import SIZES

    p = sub.add_parser("checkpoint", help="training-state checkpoint save (sync / async) and load times, size",
                       description="Save the full training state of a model after one step, synchronously and "
                                   "asynchronously (time training is blocked vs time the write takes), load it "
                                   "back, and report the size on disk.",
                       epilog="example: trident bench checkpoint --size M --dp 2 --zero")
    p.add_argument("--size", default="M", choices=sorted(SIZES), help="named model size (default M)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="default bf16")
    p.add_argument("--zero", action="store_true", help="ZeRO-1 (optim.distributed)")
    p.add_argument("--out", default="runs/bench_checkpoint", help="scratch directory (removed afterwards)")
    return p


def checkpoint(args) -> int:
    from tools.bench_checkpoint import report, run

    if args.dp < 1:
        raise ConfigError("--dp must be >= 1")
    res = run(args.size, args.dp, args.precision, args.zero, args.out)
    return print_report(report(res), res)


def memory(args) -> int:
    from tools.bench_memory import report, report_peak, run, run_peak

    if args.peak:
        res = run_peak(precision=args.precision)
        return print_report(report_peak(res), res)

    try:
        dps = [int(x) for x in args.dp.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--dp takes comma-separated integers, got {args.dp!r}") from None
    if not dps or min(dps) < 1:
        raise ConfigError("--dp sizes must be >= 1")
    res = run(args.size, dps, args.precision)
    return print_report(report(res), res)


def precision(args) -> int:
    from parallel.precision import PRECISIONS
    from tools.bench_precision import format_result, run

    wanted = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not wanted or any(p not in PRECISIONS for p in wanted):
        raise ConfigError(f"--precisions takes {', '.join(PRECISIONS)} (comma-separated), got {args.precisions!r}")
    if (args.steps is not None and args.steps < 1) or args.ppo_steps < 1 or args.seeds < 1:
        raise ConfigError("--steps, --ppo-steps and --seeds must be >= 1")
    res = run(wanted, args.out, args.steps, args.ppo, args.ppo_steps, args.seeds)
    return print_report(format_result(res), res)


def pipeline(args) -> int:
    from tools.bench_pipeline import format_result, run

    if min(args.stages, args.micro_batches, args.virtual_stages, args.steps) < 1 or args.stages < 2:
        raise ConfigError("--stages must be >= 2 and the other sizes >= 1")
    if args.micro_batches % args.stages:
        raise ConfigError("--micro-batches must be a multiple of --stages (interleaved schedule)")
    if args.forward_ms <= 0 or args.backward_ms <= 0:
        raise ConfigError("--forward-ms and --backward-ms must be > 0")
    res = run(args.stages, args.micro_batches, args.forward_ms, args.backward_ms, args.virtual_stages, args.steps)
    return print_report(format_result(res), res)


def ppo(args) -> int:
    from dataclasses import replace

    from tools.bench_ppo import SIZES, format_result, run

    if args.steps < 1 or args.warmup < 0 or (args.prompt_len is not None and args.prompt_len < 2):
        raise ConfigError("--steps must be >= 1, --warmup >= 0 and --prompt-len >= 2")
    size = SIZES[args.size] if args.prompt_len is None else replace(SIZES[args.size], prompt_len=args.prompt_len)
    backend = args.backend
    if backend == "auto":
        from engine.rollout import vllm_available
        backend = "vllm" if vllm_available() else "native"
    res = run(size, backend, args.dtype, args.steps, args.warmup, args.old_logprobs, args.size,
              vllm_eager=not args.vllm_compile, compile_layers=args.compile, vllm_cpu_reserve=args.vllm_cpu_reserve,
              network=args.network)
    return print_report(format_result(res), res)


def print_report(lines: list[str], res: dict) -> int:
    """The human-readable summary, then every number as one JSON object on the last line."""
    for line in lines:
        print(line)
    print(json.dumps(res), flush=True)
    return 0


def _fmt(res: dict) -> list[str]:
    lines = [f"size {res['size']} {res['dims']}  device {res['device_name']}  threads {res['threads']}  "
             f"malloc {res['malloc']}  engine attention {res['engine_attention']}  "
             f"tokens/step {res['tokens_per_step']}  model GFLOP/token {res['flops_per_token'] / 1e9:.3f}",
             f"matmul peak ({res['peak_dtype']}, {res['peak_n']}^3, best in run): {res['peak_tflops']:.3f} TFLOP/s"
             + (f"; fp8 _scaled_mm {res['fp8_peak_tflops']:.3f} TFLOP/s" if "fp8_peak_tflops" in res else "")]
    for name, s in res["precisions"].items():
        line = (f"engine {name:14s} {s['tokens_per_s']:10.1f} tok/s  {s['tflops']:.3f} TFLOP/s  MFU {100 * s['mfu']:.1f}%"
                f"  (best step {s['tokens_per_s_best']:.1f} tok/s)")
        if "ratio_vs_hf" in s:
            line += f"  vs transformers {s['ratio_vs_hf']:.2f}x (pairs {s['ratio_vs_hf_paired']:.2f}x)"
        if "ratio_vs_bf16" in s:
            line += f"  vs bf16 {s['ratio_vs_bf16']:.2f}x (pairs {s['ratio_vs_bf16_paired']:.2f}x)"
        lines.append(line)
    if "hf_tokens_per_s" in res:
        lines.append(f"transformers          {res['hf_tokens_per_s']:10.1f} tok/s  {res['hf_tflops']:.3f} TFLOP/s  "
                     f"MFU {100 * res['hf_mfu']:.1f}%  ({res['hf_recipe']}); first-step loss {res['first_loss_hf']:.4f} "
                     f"vs engine {res['first_loss']:.4f}")
    if "fp8" in res["precisions"] and res["device"] == "cpu":
        lines.append("note: FP8 on CPU is for correctness (its GEMMs are bf16 GEMMs of the FP8 values); its speed is the GPU's")
    if res.get("other_runnable_at_start", 0) > 0:
        lines.append(f"note: {res['other_runnable_at_start']} other runnable task(s) when the run started: other "
                     "processes share the cores, so absolute numbers are low and noisy; the interleaved ratios "
                     "are the meaningful part")
    return lines


def train(args) -> int:
    from dataclasses import replace

    import torch

    from parallel.precision import PRECISIONS
    from tools.bench_train import SIZES, run

    size = SIZES[args.size]
    over = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "seq", "batch")
            if getattr(args, k) is not None}
    size = replace(size, **over)
    if args.steps < 1 or args.warmup < 1 or args.threads < 1 or (args.peak_n is not None and args.peak_n < 1):
        raise ConfigError("--steps, --warmup, --threads and --peak-n must be >= 1")
    bad = [k for k, v in over.items() if v < 1]
    if bad:
        raise ConfigError(f"--{bad[0].replace('_', '-')} must be >= 1")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ConfigError(f"--precision takes {', '.join(PRECISIONS)} (comma-separated), got {args.precision!r}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device")
    if "fp8" in precisions:
        from engine.build import check_precision
        from engine.config import PrecisionSettings
        check_precision(PrecisionSettings(precision="fp8"), size.model_config(), 1)
    name = args.size + ("+" + ",".join(f"{k}={v}" for k, v in over.items()) if over else "")
    res = run(size, precisions, steps=args.steps, warmup=args.warmup, compare=args.compare,
              compile_layers=args.compile, threads=args.threads,
              peak_n=args.peak_n or (8192 if device == "cuda" else 2048), size_name=name,
              profile=args.profile, malloc=args.malloc, attention=args.attention, device=device)
    return print_report(_fmt(res), res)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trident bench", description="Performance benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _ppo_parser(sub)
    _pipeline_parser(sub)
    _precision_parser(sub)
    _memory_parser(sub)
    _checkpoint_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return train(args)
        if args.command == "ppo":
            return ppo(args)
        if args.command == "pipeline":
            return pipeline(args)
        if args.command == "precision":
            return precision(args)
        if args.command == "memory":
            return memory(args)
        if args.command == "checkpoint":
            return checkpoint(args)
    except TridentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
