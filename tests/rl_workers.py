"""Rank functions for the RL-math tests (2 DP ranks, one group)."""
import torch.distributed as dist

from engine import rl_math


def whiten(rank, world, xs, masks):
    group = dist.new_group(list(range(world)))
    return rl_math.masked_whiten(xs[rank], masks[rank], group)


def moments(rank, world, xs):
    group = dist.new_group(list(range(world)))
    m = rl_math.RunningMoments()
    m.update(xs[rank], group)
    return m.mean, m.var
