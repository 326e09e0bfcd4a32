"""Reward rules for PPO tests: misbehaving ones must be skipped and counted, never crash the run."""
import math


def raises_on_odd(prompt, response, record):
    if int(record["answer"]) % 2:
        raise ValueError("boom")
    return 1.0


def nan_on_odd(prompt, response, record):
    return math.nan if int(record["answer"]) % 2 else 0.5


def text_length(prompt, response, record):
    """Varies across samples, so the update has a real signal even for a random policy."""
    return len(response) / 10
