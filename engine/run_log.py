"""A run directory, written by the first rank only: config.yaml and metrics.jsonl (one JSON per line)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.config import to_dict


class RunLog:
    def __init__(self, out_dir: str, cfg, main_rank: bool):
        self.out, self.main_rank, self.history = Path(out_dir), main_rank, []
        self._file = None
        if main_rank:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self._file = open(self.out / "metrics.jsonl", "w")

    def log(self, line: dict) -> None:
        """Every rank keeps the history; the first rank also appends it to metrics.jsonl."""
        self.history.append(line)
        if self._file:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
