"""A run directory, written by the first rank only: config.yaml and metrics.jsonl (one JSON per line).

Nothing is written until the first training step has finished (`step`): a run that fails before it
(bad input, a model that does not load, a loss scale that collapses at once) leaves no directory.
Lines logged earlier (e.g. PPO's evaluation of the initial policy) are kept and written then.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.config import to_dict


class RunLog:
    """`resume_step`: a resumed run keeps the metrics lines of steps up to it (those the checkpoint
    covers; a killed run may have logged a few more) and appends after them."""

    def __init__(self, out_dir: str, cfg, main_rank: bool, resume_step: int | None = None):
        self.out, self.cfg, self.main_rank, self.history = Path(out_dir), cfg, main_rank, []
        self.resume_step = resume_step
        self._file = None
        self._pending: list[str] = []

    def _open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        path = self.out / "metrics.jsonl"
        kept = []
        if self.resume_step is not None and path.is_file():
            kept = [x + "\n" for x in path.read_text().splitlines()
                    if x.strip() and json.loads(x).get("step", 0) <= self.resume_step]
        self._file = open(path, "w")
        self._file.writelines(kept + self._pending)
        self._file.flush()
        self._pending = []

    def log(self, line: dict) -> None:
        """Every rank keeps the history; the first rank also appends it to metrics.jsonl."""
        self.history.append(line)
        if not self.main_rank:
            return
        text = json.dumps(line) + "\n"
        if self._file is None:
            self._pending.append(text)
        else:
            self._file.write(text)
            self._file.flush()

    def step(self, line: dict) -> None:
        """Log a finished training step (the first one creates the run directory)."""
        if self.main_rank and self._file is None:
            self._open()
        self.log(line)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


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
