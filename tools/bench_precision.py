"""`trident bench precision`: the demo SFT trained at several precisions, graded against bf16 (library).

Each precision trains tools/configs/demo_sft.yaml as shipped (same seed, data order and init), then its
checkpoint answers the 200 held-out problems greedily (engine/evaluate.py, fp32 weights). Reported per
precision: the final loss (mean of the last 100 steps, and the last step's), held-out accuracy, and
both against bf16 (targets of the precision issue: loss within 3%, accuracy within 3 points).
Optionally the PPO demo (tools/configs/demo_ppo.yaml) runs at one precision from the bf16 SFT
checkpoint and reports its held-out accuracy gain (target >= 0.10 for fp8; the end is the mean of the
last two evals). fp32 in the list shows the run-to-run spread: its gradients are the exact ones, so
how far it lands from bf16 is what trajectory divergence alone does on this small task.
"""
from __future__ import annotations

import time
from pathlib import Path

SFT_CONFIG, PPO_CONFIG = "tools/configs/demo_sft.yaml", "tools/configs/demo_ppo.yaml"
LOSS_TOLERANCE, ACCURACY_POINTS, PPO_GAIN = 0.03, 0.03, 0.10


def run_sft(precision: str, out: Path, steps: int | None, seed: int = 0, log=print) -> dict:
    from engine.config import load_config
    from engine.evaluate import held_out_accuracy
    from engine.train import TrainConfig, train

    run_dir = out / f"sft_{precision}_seed{seed}"
    overrides = [f"--precision={precision}", f"--out_dir={run_dir}", f"--seed={seed}"]
    if steps:
        overrides.append(f"--steps={steps}")
    t0 = time.perf_counter()
    history = train(load_config(TrainConfig, SFT_CONFIG, overrides))
    seconds = time.perf_counter() - t0
    tail = [h["loss"] for h in history[-100:]]
    acc = held_out_accuracy(run_dir / "checkpoint")
    res = {"final_loss": sum(tail) / len(tail), "last_step_loss": history[-1]["loss"], "held_out_accuracy": acc,
           "train_s": round(seconds, 1), "steps": len(history), "seed": seed}
    if precision == "fp16":
        res["skipped_steps"] = history[-1].get("skipped_steps", 0)
        res["final_loss_scale"] = history[-1].get("loss_scale")
    log(f"{precision} seed {seed}: final loss {res['final_loss']:.4f} (last step {res['last_step_loss']:.4f}), "
        f"held-out accuracy {acc:.3f}, {seconds:.0f} s")
    return res


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5


def run_ppo(precision: str, actor: Path, out: Path, steps: int, log=print) -> dict:
    from engine.config import load_config
    from engine.ppo import PPOConfig, ppo

    cfg = load_config(PPOConfig, PPO_CONFIG, [f"--precision={precision}", f"--actor={actor}", f"--steps={steps}",
                                              f"--out_dir={out / f'ppo_{precision}'}", "--export_hf=false",
                                              f"--eval.every={max(1, steps // 6)}"])
    t0 = time.perf_counter()
    acc = [h["eval_accuracy"] for h in ppo(cfg) if "eval_accuracy" in h]
    end = (acc[-1] + acc[-2]) / 2  # one 200-problem eval moves by a few points from one eval to the next
    res = {"eval_accuracy": acc, "eval_accuracy_first": acc[0], "eval_accuracy_end": end, "gain": end - acc[0],
           "best": max(acc), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
           "gain_target": PPO_GAIN, "within_target": end - acc[0] >= PPO_GAIN - 1e-6}
    log(f"PPO {precision}: held-out accuracy {acc[0]:.3f} -> {end:.3f} (mean of the last two evals) in {steps} steps")
    return res


def run(precisions: list[str], out: str, steps: int | None = None, ppo: str | None = None, ppo_steps: int = 150,
        seeds: int = 1, log=print) -> dict:
    """Each precision with seeds 0..seeds-1 (init and data order); compared by their means, with the
    spread over seeds (std) beside them."""
    out_dir = Path(out)
    wanted = list(dict.fromkeys(["bf16"] + precisions))
    sft = {}
    for p in wanted:
        runs = [run_sft(p, out_dir, steps, seed, log) for seed in range(seeds)]
        loss, loss_std = _mean_std([r["final_loss"] for r in runs])
        acc, acc_std = _mean_std([r["held_out_accuracy"] for r in runs])
        sft[p] = {**runs[0], "final_loss": loss, "held_out_accuracy": acc, "final_loss_std": loss_std,
                  "held_out_accuracy_std": acc_std, "train_s": round(sum(r["train_s"] for r in runs) / seeds, 1),
                  "runs": runs}
    base = sft["bf16"]
    for p, r in sft.items():
        if p != "bf16":
            r["loss_vs_bf16"] = r["final_loss"] / base["final_loss"] - 1
            r["accuracy_vs_bf16"] = r["held_out_accuracy"] - base["held_out_accuracy"]
            r["within_targets"] = (abs(r["loss_vs_bf16"]) <= LOSS_TOLERANCE
                                   and abs(r["accuracy_vs_bf16"]) <= ACCURACY_POINTS)
    res = {"config": SFT_CONFIG, "seeds": seeds, "sft": sft,
           "targets": {"loss": LOSS_TOLERANCE, "accuracy_points": ACCURACY_POINTS}}
    if ppo:
        res["ppo"] = run_ppo(ppo, out_dir / "sft_bf16_seed0" / "checkpoint", out_dir, ppo_steps, log)
    return res


def format_result(res: dict) -> list[str]:
    lines = [f"demo SFT ({res['config']}) by precision, mean of {res['seeds']} seed(s) (+- std over seeds); "
             "final loss = mean of the last 100 steps"]
    for p, r in res["sft"].items():
        line = (f"{p:5s} loss {r['final_loss']:.4f} +- {r['final_loss_std']:.4f}  held-out accuracy "
                f"{r['held_out_accuracy']:.3f} +- {r['held_out_accuracy_std']:.3f}  ({r['train_s']:.0f} s a run)")
        if "loss_vs_bf16" in r:
            line += (f"  vs bf16: loss {100 * r['loss_vs_bf16']:+.1f}%, accuracy {100 * r['accuracy_vs_bf16']:+.1f} "
                     f"points -> {'within' if r['within_targets'] else 'OUTSIDE'} the 3% / 3-point targets")
        lines.append(line)
    if "ppo" in res:
        r = res["ppo"]
        lines.append(f"PPO demo: held-out accuracy {r['eval_accuracy_first']:.3f} -> {r['eval_accuracy_end']:.3f} "
                     f"(+{r['gain']:.3f}; target +{r['gain_target']:.2f}: {'met' if r['within_target'] else 'NOT met'})")
    return lines
