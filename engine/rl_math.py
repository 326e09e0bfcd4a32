"""RL math for PPO as pure tensor functions (in the spirit of veRL's core_algos).

Shapes: [batch, response_len]; `mask` is 1 on real response tokens (0 on padding after EOS).
Functions that need batch statistics take an optional process group: the statistics are then
gathered across data-parallel ranks, so whitening on 2 ranks equals whitening the concatenation.
Everything stays on the inputs' device; loss statistics are returned as detached 0-dim tensors.
"""
from __future__ import annotations

import torch

from parallel import comm


def masked_sum(x: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    return comm.all_reduce((x * mask).sum(), group) if group is not None else (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over masked entries (of all DP ranks when a group is given). Differentiable locally."""
    total = (x * mask).sum()
    count = mask.sum().detach().clone()
    if group is not None:
        count = comm.all_reduce(count, group)
        # forward: global mean; backward: each rank's share (the sum of shares is the global gradient)
        total = comm.reduce_from_tensor_model_parallel_region(total, group)
    return total / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, group=None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries across all DP ranks (unbiased variance, like TRL/veRL)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    comm.all_reduce(stats, group)
    s, ss, n = stats.unbind()
    mean = s / n
    var = (ss / n - mean * mean) * n / (n - 1).clamp(min=1)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.clamp(min=0).to(x.dtype) + eps)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    k1 = log r', k2 = (log r')^2 / 2, k3 = (r - 1) - log r, with r = pi_ref / pi and log r' = -log r.
    """
    return kl_from_log_ratio(logp - ref_logp, kind)


def kl_from_log_ratio(log_ratio: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """kl_penalty from log pi - log pi_ref already formed (k1 is that difference itself)."""
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        neg = -log_ratio
        return neg.exp() - 1 - neg
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token reward: -kl_coef * kl on every token, plus the sequence score on the last real token."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(-1) > 0
    rewards[torch.arange(len(last), device=mask.device), last] += scores.float() * has_tokens
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns). Padding contributes nothing:
    the value after the last real token is 0, and masked steps pass the running estimate through."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m + last * (1 - m)
        next_value = values[:, t] * m + next_value * (1 - m)
        adv[:, t] = last * m
    return adv, (adv + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo",
                     valid: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free outcome advantage per sequence, baselined on the other samples of its prompt.

    Rows come in consecutive groups of `group_size` samples of one prompt. Invalid samples (skipped
    rewards) get 0 and are left out of their group's statistics.
      grpo: (r - mean_g) / (std_g + eps)             (Shao et al. 2024, unbiased std)
      rloo: r - mean of the group's other samples    (Ahmadian et al. 2024)
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} samples do not split into groups of {group_size}")
    r = scores.float().view(-1, group_size)
    v = (torch.ones_like(r) if valid is None else valid.float().view(-1, group_size))
    r = r * v
    n = v.sum(-1, keepdim=True)
    total = r.sum(-1, keepdim=True)
    if method == "rloo":
        adv = r - (total - r) / (n - 1).clamp(min=1)
    elif method == "grpo":
        mean = total / n.clamp(min=1)
        var = ((r - mean).square() * v).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        adv = (r - mean) / (var.sqrt() + eps)
    else:
        raise ValueError(f"unknown group advantage {method!r} (grpo, rloo)")
    adv = adv * v * (n > 1)  # a prompt with a single valid sample has no baseline: no signal
    return adv.view(-1)


def outcome_advantages(seq_advantages: torch.Tensor, mask: torch.Tensor,
                       token_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantage = the sequence's advantage plus the reward-to-go of per-token rewards
    (e.g. the -coef * KL penalty), undiscounted; 0 on padding."""
    adv = seq_advantages.float()[:, None].expand_as(mask)
    if token_rewards is not None:
        adv = adv + (token_rewards * mask).flip(-1).cumsum(-1).flip(-1)
    return adv * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2, dual_clip: float | None = None, group=None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (optionally dual-clip, Ye et al. 2020); returns (loss, stats)."""
    ratio = (logp - old_logp).exp()
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(surr1, surr2)
    clipped = (surr2 > surr1).float()
    if dual_clip is not None:
        # for negative advantages, bound the loss by -dual_clip * A so huge ratios cannot dominate
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    stats = {"clip_frac": masked_mean(clipped, mask, group).detach(),
             "approx_kl": masked_mean(0.5 * (logp - old_logp).detach().square(), mask, group)}
    return masked_mean(loss, mask, group), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, group=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2)."""
    err = (values - returns).square()
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns).square()
        stats = {"value_clip_frac": masked_mean((err_clipped > err).float(), mask, group).detach()}
        err = torch.maximum(err, err_clipped)
    else:
        stats = {"value_clip_frac": 0.0}
    return 0.5 * masked_mean(err, mask, group), stats


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient so the observed KL tracks `target`."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean/std of rewards across steps and DP ranks (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor, group=None, mask: torch.Tensor | None = None) -> None:
        """Fold in the entries of x (those where mask is true; no boolean indexing, so no device sync
        for a data-dependent shape)."""
        m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
        stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
        comm.all_reduce(stats, group)
        s, ss, n = stats.tolist()
        if n == 0:
            return
        b_mean = s / n
        b_var = max(ss / n - b_mean * b_mean, 0.0)
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta * delta * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var ** 0.5 + 1e-8)
