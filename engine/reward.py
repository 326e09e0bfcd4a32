"""Rewards: rule-based Python functions, trained reward models (scalar head), or weighted mixes.

A rule is `fn(prompt: str, response: str, record: dict) -> float`, named by a registry key
("arith") or an import path ("my_pkg.rewards:fn"). A rule that raises or returns a non-finite value
makes that sample *skipped* (kept out of the update, counted in the metrics), never a crash or hang.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch

from engine.errors import ConfigError


def arith_reward(prompt: str, response: str, record: dict) -> float:
    """1 for the exact answer (surrounding spaces ignored), else 0."""
    return 1.0 if response.strip() == str(record["answer"]).strip() else 0.0


RULES = {"arith": arith_reward}


def resolve_rule(name: str):
    if name in RULES:
        return RULES[name]
    if ":" not in name:
        raise ConfigError(f"unknown reward rule {name!r} (known: {', '.join(RULES)}, or module:function)")
    module, fn = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import reward rule {name!r}: {e}") from None


@dataclass
class RewardConfig:
    rules: dict[str, float] = field(default_factory=lambda: {"arith": 1.0})
    """Rule name (or module:function) -> weight."""
    model: str | None = None
    """Native checkpoint or HF dir of a trained reward model (scalar head); None for rules only."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the sum."""


def rule_scores(rules: dict, prompts: list[str], responses: list[str], records: list[dict]):
    """(scores [B], valid [B] bool): weighted sum of the rules; invalid where any rule failed."""
    fns = [(resolve_rule(name), w) for name, w in rules.items()]
    scores, valid = [], []
    for p, r, rec in zip(prompts, responses, records):
        total, ok = 0.0, True
        for fn, w in fns:
            try:
                value = float(fn(p, r, rec))
            except Exception:
                ok = False
                break
            if not math.isfinite(value):
                ok = False
                break
            total += w * value
        scores.append(total if ok else 0.0)
        valid.append(ok)
    return torch.tensor(scores), torch.tensor(valid)
