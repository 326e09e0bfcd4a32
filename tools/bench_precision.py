"""`trident bench precision`: the demo SFT trained at several precisions, graded against bf16 (library).

Each precision trains tools/configs/demo_sft.yaml as shipped (same seed, data order and init), then its
checkpoint answers the 200 held-out problems greedily (engine/evaluate.py, fp32 weights). Reported per
precision: the final loss (mean of the last 100 steps, and the last step's), held-out accuracy, and
both against bf16 (targets of the precision issue: loss within 3%, accuracy within 3 points).
Optionally the PPO demo (tools/configs/demo_ppo.yaml) runs at one precision from the bf16 SFT
checkpoint and reports its held-out accuracy gain (target >= 0.10 for fp8).
"""
from __future__ import annotations

import time
from pathlib import Path

SFT_CONFIG, PPO_CONFIG = "tools/configs/demo_sft.yaml", "tools/configs/demo_ppo.yaml"
LOSS_TOLERANCE, ACCURACY_POINTS, PPO_GAIN = 0.03, 0.03, 0.10


def run_sft(precision: str, out: Path, steps: int | None, log=print) -> dict:
    from engine.config import load_config
    from engine.evaluate import held_out_accuracy
    from engine.train import TrainConfig, train

    overrides = [f"--precision={precision}", f"--out_dir={out / f'sft_{precision}'}"]
    if steps:
        overrides.append(f"--steps={steps}")
    t0 = time.perf_counter()
    history = train(load_config(TrainConfig, SFT_CONFIG, overrides))
    seconds = time.perf_counter() - t0
    tail = [h["loss"] for h in history[-100:]]
    acc = held_out_accuracy(out / f"sft_{precision}" / "checkpoint")
    res = {"final_loss": sum(tail) / len(tail), "last_step_loss": history[-1]["loss"], "held_out_accuracy": acc,
           "train_s": round(seconds, 1), "steps": len(history)}
    if precision == "fp16":
        res["skipped_steps"] = history[-1].get("skipped_steps", 0)
        res["final_loss_scale"] = history[-1].get("loss_scale")
    log(f"{precision}: final loss {res['final_loss']:.4f} (last step {res['last_step_loss']:.4f}), held-out "
        f"accuracy {acc:.3f}, {seconds:.0f} s")
    return res


def run_ppo(precision: str, actor: Path, out: Path, steps: int, log=print) -> dict:
    from engine.config import load_config
    from engine.ppo import PPOConfig, ppo

    cfg = load_config(PPOConfig, PPO_CONFIG, [f"--precision={precision}", f"--actor={actor}", f"--steps={steps}",
                                              f"--out_dir={out / f'ppo_{precision}'}", "--export_hf=false",
                                              f"--eval.every={max(1, steps // 2)}"])
    t0 = time.perf_counter()
    acc = [h["eval_accuracy"] for h in ppo(cfg) if "eval_accuracy" in h]
    res = {"eval_accuracy_first": acc[0], "eval_accuracy_last": acc[-1], "gain": acc[-1] - acc[0],
           "best": max(acc), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
           "gain_target": PPO_GAIN, "within_target": acc[-1] - acc[0] >= PPO_GAIN}
    log(f"PPO {precision}: held-out accuracy {acc[0]:.3f} -> {acc[-1]:.3f} in {steps} steps")
    return res


def run(precisions: list[str], out: str, steps: int | None = None, ppo: str | None = None, ppo_steps: int = 100,
        log=print) -> dict:
    out_dir = Path(out)
    wanted = list(dict.fromkeys(["bf16"] + precisions))
    sft = {p: run_sft(p, out_dir, steps, log) for p in wanted}
    base = sft["bf16"]
    for p, r in sft.items():
        if p != "bf16":
            r["loss_vs_bf16"] = r["final_loss"] / base["final_loss"] - 1
            r["accuracy_vs_bf16"] = r["held_out_accuracy"] - base["held_out_accuracy"]
            r["within_targets"] = (abs(r["loss_vs_bf16"]) <= LOSS_TOLERANCE
                                   and abs(r["accuracy_vs_bf16"]) <= ACCURACY_POINTS)
    res = {"config": SFT_CONFIG, "sft": sft, "targets": {"loss": LOSS_TOLERANCE, "accuracy_points": ACCURACY_POINTS}}
    if ppo:
        res["ppo"] = run_ppo(ppo, out_dir / "sft_bf16" / "checkpoint", out_dir, ppo_steps, log)
    return res


def format_result(res: dict) -> list[str]:
    lines = [f"demo SFT ({res['config']}) by precision; final loss = mean of the last 100 steps"]
    for p, r in res["sft"].items():
        line = (f"{p:5s} loss {r['final_loss']:.4f}  held-out accuracy {r['held_out_accuracy']:.3f}  "
                f"({r['train_s']:.0f} s)")
        if "loss_vs_bf16" in r:
            line += (f"  vs bf16: loss {100 * r['loss_vs_bf16']:+.1f}%, accuracy {100 * r['accuracy_vs_bf16']:+.1f} "
                     f"points -> {'within' if r['within_targets'] else 'OUTSIDE'} the 3% / 3-point targets")
        lines.append(line)
    if "ppo" in res:
        r = res["ppo"]
        lines.append(f"PPO demo: held-out accuracy {r['eval_accuracy_first']:.3f} -> {r['eval_accuracy_last']:.3f} "
                     f"(+{r['gain']:.3f}; target +{r['gain_target']:.2f}: {'met' if r['within_target'] else 'NOT met'})")
    return lines
