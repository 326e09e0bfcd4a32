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
    def __init__(self, out_dir: str, cfg, main_rank: bool):
        self.out, self.cfg, self.main_rank, self.history = Path(out_dir), cfg, main_rank, []
        self._file = None
        self._pending: list[str] = []

    def _open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self._file = open(self.out / "metrics.jsonl", "w")
        self._file.writelines(self._pending)
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
