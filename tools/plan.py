"""`trident plan`: pick TP x PP x DP, virtual stages, micro-batch, recomputation and ZeRO for a cluster
from a closed-form performance and memory model (tools/perf_model.py), without launching anything.

  trident plan --hf-config config.json --seq 4096 --global-batch 1024 --gpus 512 --gpu h100-sxm
  trident plan --hidden 12288 --layers 80 --heads 96 --ffn 49152 --vocab 51200 --seq 2048 \\
      --global-batch 2304 --gpus 1536 --gpu a100-80gb --tp 8 --pp 8 --vp 2 --recompute full

Prints the best layouts as a table, then one JSON line: tflops_per_gpu, mfu, step_s, tokens_per_s,
memory_gib_per_gpu (weights, grads, optimizer, activations), bubble, the layout, and why it won.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from engine.errors import ConfigError, TridentError
from tools.perf_model import GPU, GPUS, MEGATRON_2021, Layout, Shape, check_layout, search


def hf_shape(path: str, seq: int) -> Shape:
    """A Shape from an HF config.json (Llama / Mistral / Qwen2 fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    try:
        return Shape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                     c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"],
                     c["vocab_size"], seq)
    except KeyError as e:
        raise ConfigError(f"{path} lacks {e.args[0]}") from None


def model_shape(args, seq: int) -> Shape:
    if args.hf_config:
        return hf_shape(args.hf_config, seq)
    need = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": args.vocab}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise ConfigError(f"give --hf-config or --{' --'.join(missing)}")
    return Shape(args.hidden, args.layers, args.heads, args.kv_heads or args.heads, args.ffn or 4 * args.hidden,
                 args.vocab, seq, swiglu=args.ffn is not None and not args.gelu)


def add_model_and_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-config", help="an HF config.json (Llama / Mistral / Qwen2 fields)")
    for name in ("hidden", "layers", "heads", "kv-heads", "ffn", "vocab"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--gelu", action="store_true", help="a 2-matrix GELU MLP (GPT) instead of SwiGLU")
    p.add_argument("--gpus", type=int, help="GPUs in the job (required unless --calibrate)")
    p.add_argument("--gpu", default="h100-sxm", help=f"one of {', '.join(GPUS)} (default h100-sxm)")
    for name, what in (("peak-tflops", "dense bf16 peak"), ("hbm-gib", "HBM per GPU"), ("hbm-tbps", "HBM TB/s"),
                       ("nvlink-gbps", "NVLink GB/s"), ("net-gbps", "inter-node GB/s per GPU")):
        p.add_argument(f"--{name}", type=float, help=f"override the GPU's {what}")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp8"])


def gpu_from_args(args) -> GPU:
    if args.gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {args.gpu!r}: one of {', '.join(GPUS)}")
    over = {"bf16_tflops": "peak_tflops", "hbm_gib": "hbm_gib", "hbm_tbps": "hbm_tbps", "nvlink_gbps": "nvlink_gbps",
            "net_gbps": "net_gbps"}
    given = {field: getattr(args, arg) for field, arg in over.items() if getattr(args, arg) is not None}
    for field, v in given.items():
        if v <= 0:
            raise ConfigError(f"--{over[field].replace('_', '-')} must be > 0, got {v}")
    return replace(GPUS[args.gpu], **given)


def check_positive(args, names) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def parse(argv):
    p = argparse.ArgumentParser(prog="trident plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    add_model_and_gpu_args(p)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step (required unless --calibrate)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine and check the model against bench train (S, M) and bench pipeline")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--vp", type=int, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--recompute", choices=["none", "selective", "full"])
    p.add_argument("--zero", type=int, choices=[0, 1])
    p.add_argument("--top", type=int, default=5, help="layouts in the table (default 5)")
    return p.parse_args(argv)


def explain(best: dict, others: list[dict]) -> str:
    t = best["time_s"]
    parts = [f"bubble {best['bubble']:.1%}", f"TP comm {t['tp_comm']:.3f} s", f"DP comm {t['dp_comm']:.3f} s",
             f"{best['memory_gib_per_gpu']['total']:.1f} GiB per GPU"]
    if others:
        nxt = others[0]
        parts.append(f"{nxt['step_s'] / best['step_s'] - 1:.1%} faster than the next ({_fmt(nxt['layout'])})")
    return "; ".join(parts)


def _fmt(lay: dict) -> str:
    return (f"tp{lay['tp']} pp{lay['pp']} dp{lay['dp']} mb{lay['micro_batch']} vp{lay['vp']} "
            f"{lay['recompute']} zero{lay['zero']}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["ppo"]:
        from tools.plan_ppo import main as plan_ppo
        return plan_ppo(argv[1:])
    args = parse(argv)
    if args.calibrate:
        from tools.bench import print_report
        from tools.plan_calibrate import report, run
        res = run()
        return print_report(report(res), res)
    try:
        if args.gpus is None or args.global_batch is None:
            raise ConfigError("give --gpus and --global-batch (or --calibrate)")
        check_positive(args, ("gpus", "global_batch", "seq", "top", "tp", "pp", "vp", "micro_batch", "hidden",
                              "layers", "heads", "kv_heads", "ffn", "vocab"))
        gpu = gpu_from_args(args)
        shape = model_shape(args, args.seq)
        fixed = {k: v for k, v in (("tp", args.tp), ("pp", args.pp), ("vp", args.vp), ("micro_batch", args.micro_batch),
                                   ("recompute", args.recompute), ("zero", args.zero)) if v is not None}
        if "tp" in fixed and "pp" in fixed:
            dp = args.gpus // (fixed["tp"] * fixed["pp"])
            probe = Layout(fixed["tp"], fixed["pp"], max(dp, 1), fixed.get("micro_batch", 1), fixed.get("vp", 1))
            check_layout(shape, probe, args.global_batch, args.gpus, gpu)
        ranked = search(shape, args.global_batch, args.gpus, gpu, args.precision, MEGATRON_2021, fixed)
    except TridentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{shape.params / 1e9:.2f} B parameters on {args.gpus} x {gpu.name}, batch {args.global_batch} x {args.seq}")
    print(f"{'layout':<44}{'step s':>9}{'TFLOP/s':>9}{'MFU':>7}{'bubble':>8}{'GiB':>7}")
    for r in ranked[:args.top]:
        print(f"{_fmt(r['layout']):<44}{r['step_s']:>9.3f}{r['tflops_per_gpu']:>9.1f}{r['mfu']:>7.1%}"
              f"{r['bubble']:>8.1%}{r['memory_gib_per_gpu']['total']:>7.1f}")
    best = ranked[0]
    out = {k: best[k] for k in ("tflops_per_gpu", "mfu", "step_s", "tokens_per_s", "memory_gib_per_gpu", "bubble",
                                "layout", "time_s")}
    out["why"] = explain(best, ranked[1:])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
