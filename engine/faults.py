"""Fault injection for the crash-safety tests: `TRIDENT_CRASH_AT=point[,point...]` makes the rank
named by `TRIDENT_CRASH_RANK` (default 0) SIGKILL itself when it reaches one of the points
(save:mid_shard:N, save:before_rename:N, save:before_latest:N at the save of step N; after_step:N;
engine:generate:N and engine:sync:N at a separate rollout engine's Nth generation or weight sync).
`TRIDENT_STALL_AT` names points where that rank hangs instead (a stalled peer, not a dead one).
Unset, each costs one dict lookup."""
from __future__ import annotations

import os
import signal
import time


def crash_point(name: str) -> None:
    points = os.environ.get("TRIDENT_CRASH_AT")
    if not points or name not in points.split(","):
        return
    if os.environ.get("RANK", "0") == os.environ.get("TRIDENT_CRASH_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def stall_point(name: str) -> None:
    points = os.environ.get("TRIDENT_STALL_AT")
    if not points or name not in points.split(","):
        return
    if os.environ.get("RANK", "0") == os.environ.get("TRIDENT_CRASH_RANK", "0"):
        while True:
            time.sleep(3600)

