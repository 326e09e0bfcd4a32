"""Rank functions for the RL-math tests (2 DP ranks, one group)."""
import torch.distributed as dist

from engine import rl_math
from parallel import comm


def whiten(rank, world, xs, masks):
    group = dist.new_group(list(range(world)))
    return rl_math.masked_whiten(xs[rank], masks[rank], group)


def moments(rank, world, xs):
    group = dist.new_group(list(range(world)))
    m = rl_math.RunningMoments()
    m.update(xs[rank], group)
    return m.mean, m.var


def whiten_and_moments(rank, world, xs, masks):
    """masked_whiten of this rank's rows and RunningMoments fed batch by batch, over both ranks."""
    group = dist.new_group(list(range(world)))
    whitened = rl_math.masked_whiten(xs[rank], masks[rank], group)
    m = rl_math.RunningMoments()
    for x, mask in zip(xs[rank].unbind(0), masks[rank].unbind(0)):  # one row per update
        m.update(x, group, mask)
    return whitened, (m.mean, m.var)


def aggregated_losses(rank, world, logp, old, adv, mask, micro, mode, clip):
    """This rank's rows in micro-batches of `micro`: the sum of each one's share of the policy loss
    (normalised by the minibatch over both ranks), and d(loss)/d(logp) of this rank's rows."""
    group = dist.new_group(list(range(world)))
    rows = slice(rank * len(logp) // world, (rank + 1) * len(logp) // world)
    lp = logp[rows].clone().requires_grad_()
    norm = rl_math.LossNorm.of(mask[rows], group)
    total = 0.0
    for i in range(0, lp.shape[0], micro):
        mb = slice(i, i + micro)
        loss, _ = rl_math.policy_loss(lp[mb], old[rows][mb], adv[rows][mb], mask[rows][mb], *clip,
                                      loss_agg=mode, norm=norm)
        loss.backward()
        total = total + loss.detach()
    return comm.all_reduce(total.clone(), group).item(), lp.grad


def reinforce_pp(rank, world, rewards, mask):
    group = dist.new_group(list(range(world)))
    rows = slice(rank * len(rewards) // world, (rank + 1) * len(rewards) // world)
    return rl_math.reinforce_pp_advantages(rewards[rows], mask[rows], 0.9, group)
