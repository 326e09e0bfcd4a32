"""`trident ppo --launcher ray`: the run as Ray actors (parallel/launch_ray.py), one per rank."""
from __future__ import annotations

import json
import os

import torch

from engine.config import parse_run_args
from engine.errors import ConfigError, RunFailed
from engine.ppo import PPOConfig, check_config, check_placement, ppo, summary


def ray_rank(argv: list[str]) -> dict | None:
    """One rank under `--launcher ray` (parallel/launch_ray.py): the run, and rank 0's summary."""
    cfg = parse_run_args(PPOConfig, argv, "trident ppo", "PPO for RLHF.")
    history = ppo(cfg)
    return summary(cfg, history) if int(os.environ.get("RANK", "0")) == 0 else None


def launch_on_ray(cfg: PPOConfig, argv: list[str], ranks: int, address: str | None) -> int:
    if ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {ranks}")
    check_config(cfg)
    spare = check_placement(cfg, ranks)  # before any actor starts
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("--launcher ray needs Ray (pip install .[ray])") from None
    from parallel import launch_ray
    try:
        results = launch_ray.run("engine.ppo_ray:ray_rank", (argv,), [("trainer", ranks - spare), ("rollout", spare)],
                                 gpus_per_rank=1 if torch.cuda.is_available() else 0, address=address)
    except launch_ray.RankDied as err:
        raise RunFailed(str(err)) from None
    print(json.dumps(results[0]))
    return 0
