"""Render a run's metrics.jsonl to a PNG of its curves (reward, KL, accuracy / loss)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = [("reward_mean", "reward"), ("kl", "KL to reference"), ("eval_accuracy", "held-out accuracy"),
          ("eval_reward", "held-out reward-model score"),
          ("loss", "loss"), ("value_loss", "value loss"), ("entropy", "entropy")]


def plot_metrics(metrics: str | Path, out: str | Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [json.loads(x) for x in Path(metrics).read_text().splitlines() if x.strip()]
    panels = [(k, t) for k, t in PANELS if any(k in line for line in lines)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        pts = [(line["step"], line[key]) for line in lines if key in line]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


if __name__ == "__main__":
    print(plot_metrics(sys.argv[1], sys.argv[2]))
