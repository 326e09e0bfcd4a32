"""Rank functions for multi-rank training tests."""
from engine.config import load_config
from engine.train import TrainConfig, train


def train_losses(rank, world, runs):
    """runs: list of override lists; returns each run's loss curve."""
    return [[m["loss"] for m in train(load_config(TrainConfig, None, overrides))] for overrides in runs]


def ppo_history(rank, world, overrides):
    from engine.ppo import PPOConfig, ppo
    return ppo(load_config(PPOConfig, None, overrides))
