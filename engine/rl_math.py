"""RL math for PPO as pure tensor functions (in the spirit of veRL's core_algos).

Shapes: [batch, response_len]; `mask` is 1 on real response tokens (0 on padding after EOS).
Functions that need batch statistics take an optional process group: the statistics are then
gathered across data-parallel ranks, so whitening on 2 ranks equals whitening the concatenation.
Statistics are two-pass in float64 (exact to float32 round-off at any offset: rewards of mean 1e5 and
std 1 whiten as well as rewards of mean 0). Losses are aggregated by `agg_loss` against a `LossNorm`
of the whole minibatch, so micro-batches and DP ranks each add their exact share of it.
Everything stays on the inputs' device; loss statistics are returned as detached 0-dim tensors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from parallel import comm

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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


def masked_moments(x: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations, count) of the masked entries over every DP rank, as float64
    0-dim tensors. Two passes (the mean first, then the deviations from it), each summed in float64:
    E[x^2] - E[x]^2 in float32 loses everything at a large offset (std 1 around 1e3 reads as ~0.3)."""
    xd, m = x.detach().double(), mask.double()
    first = comm.all_reduce(torch.stack([(xd * m).sum(), m.sum()]), group)
    mean = first[0] / first[1].clamp(min=1)
    sq_dev = comm.all_reduce(((xd - mean).square() * m).sum(), group)
    return mean, sq_dev, first[1]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, group=None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries across all DP ranks (unbiased variance, like TRL/veRL).
    The subtraction runs in float64 too: a float32 mean of 1e5 is itself off by ~4e-3."""
    mean, sq_dev, n = masked_moments(x, mask, group)
    var = sq_dev / (n - 1).clamp(min=1)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.to(x.dtype) * mask


# ---- KL ---------------------------------------------------------------------------------------------

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", clamp: float | None = None) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    k1 = log r', k2 = (log r')^2 / 2, k3 = (r - 1) - log r, with r = pi_ref / pi and log r' = -log r.
    clamp bounds the estimate to [-clamp, clamp] (veRL clamps k3, its low_var_kl, to 10).
    """
    return kl_from_log_ratio(logp - ref_logp, kind, clamp)


def kl_from_log_ratio(log_ratio: torch.Tensor, kind: str = "k1", clamp: float | None = None) -> torch.Tensor:
    """kl_penalty from log pi - log pi_ref already formed (k1 is that difference itself)."""
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    elif kind == "k3":
        neg = -log_ratio
        kl = neg.exp() - 1 - neg
    else:
        raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")
    return kl if clamp is None else kl.clamp(-clamp, clamp)


# ---- rewards and advantages ----------------------------------------------------------------------------

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


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} over each row's real tokens; 0 on padding."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def group_advantages(scores: torch.Tensor, group_size: int, method: str = "grpo",
                     valid: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Critic-free outcome advantage per sequence, baselined on the other samples of its prompt.

    Rows come in consecutive groups of `group_size` samples of one prompt. Invalid samples (skipped
    rewards) get 0 and are left out of their group's statistics. A prompt with a single valid sample
    has no baseline, so it gets 0 too (no signal), under every method.
      grpo:    (r - mean_g) / (std_g + eps)          (Shao et al. 2024, unbiased std)
      dr_grpo: r - mean_g                            (Liu et al. 2025, "GRPO done right": no std)
      rloo:    r - mean of the group's other samples (Ahmadian et al. 2024)
    Computed in float64 (a large score offset cancels exactly), returned as float32.
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} samples do not split into groups of {group_size}")
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group advantage {method!r} ({', '.join(GROUP_METHODS)})")
    r = scores.double().view(-1, group_size)
    v = torch.ones_like(r) if valid is None else valid.double().view(-1, group_size)
    r = r * v
    n = v.sum(-1, keepdim=True)
    total = r.sum(-1, keepdim=True)
    mean = total / n.clamp(min=1)
    if method == "rloo":
        adv = r - (total - r) / (n - 1).clamp(min=1)
    elif method == "dr_grpo":
        adv = r - mean
    else:
        var = ((r - mean).square() * v).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        adv = (r - mean) / (var.sqrt() + eps)
    adv = adv * v * (n > 1)
    return adv.view(-1).float()


def outcome_advantages(seq_advantages: torch.Tensor, mask: torch.Tensor,
                       token_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token advantage = the sequence's advantage plus the reward-to-go of per-token rewards
    (e.g. the -coef * KL penalty), undiscounted; 0 on padding."""
    adv = seq_advantages.float()[:, None].expand_as(mask)
    if token_rewards is not None:
        adv = adv + (token_rewards * mask).flip(-1).cumsum(-1).flip(-1)
    return adv * mask


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            group=None) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025; OpenRLHF `reinforce`, veRL `reinforce_plus_plus`): the discounted
    return of the token rewards (score on the last token, -coef * KL on each), whitened over the
    global batch (every DP rank's tokens). For REINFORCE++-baseline the scores are first centred on
    their group's mean (group_advantages(..., "dr_grpo"))."""
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask, group)


# ---- losses ---------------------------------------------------------------------------------------------

class LossNorm(NamedTuple):
    """Denominators of one minibatch's loss over all its micro-batches and DP ranks (float64 0-dim):
    each micro-batch's `agg_loss` is then its exact share, and the shares (summed by gradient
    accumulation and DDP's all-reduce) give the minibatch aggregate, not a mean of per-rank means."""
    tokens: torch.Tensor
    seqs: torch.Tensor

    @staticmethod
    def of(mask: torch.Tensor, group=None) -> "LossNorm":
        """Real tokens and sequences with at least one real token, in `mask` on every DP rank."""
        counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).double()
        tokens, seqs = comm.all_reduce(counts, group).clamp(min=1).unbind()
        return LossNorm(tokens, seqs)


def agg_loss(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             norm: LossNorm | None = None) -> torch.Tensor:
    """This batch's share of a per-token quantity aggregated over the minibatch `norm` counts (default:
    this batch alone). With T tokens and S sequences in the minibatch:
      token-mean:          sum_i sum_t x_it / T                (veRL's default, OpenRLHF, TRL)
      seq-mean-token-mean: sum_i mean_t x_it / S               (the GRPO paper's sample-level mean)
      seq-mean-token-sum:  sum_i sum_t x_it / S                (Dr. GRPO: no per-sequence length
                                                                normalisation, so no length bias)
    """
    norm = LossNorm.of(mask) if norm is None else norm
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / norm.tokens.to(values.dtype)
    if mode == "seq-mean-token-sum":
        return masked.sum() / norm.seqs.to(values.dtype)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm.seqs.to(values.dtype)
    raise ValueError(f"unknown loss aggregation {mode!r} ({', '.join(LOSS_AGGS)})")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                log_ratio_clamp: float | None = None, loss_agg: str = "token-mean",
                norm: LossNorm | None = None) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate; returns (this batch's share of the loss, stats as token-mean shares).

    The ratio is clipped to [1 - clip_low, 1 + clip_high] (clip_high defaults to clip_low; DAPO's
    clip-higher raises it, e.g. 0.28, so unlikely tokens can grow). dual_clip (Ye et al. 2020) bounds
    the loss of negative advantages by -dual_clip * A. log_ratio_clamp bounds log(pi / pi_old) before
    the exponential (veRL clamps it to +-20), so one token whose ratio overflows cannot make the loss inf;
    its gradient is zero there, like a clipped token's.
    """
    log_ratio = logp - old_logp
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()
    high = clip_low if clip_high is None else clip_high
    surr1 = -advantages * ratio
    surr2 = -advantages * ratio.clamp(1 - clip_low, 1 + high)
    loss = torch.maximum(surr1, surr2)
    clipped = (surr2 > surr1).float()
    if dual_clip is not None:
        capped = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, capped, loss)
    norm = LossNorm.of(mask) if norm is None else norm
    stats = {"clip_frac": agg_loss(clipped, mask, "token-mean", norm).detach(),
             "approx_kl": agg_loss(0.5 * log_ratio.detach().square(), mask, "token-mean", norm)}
    return agg_loss(loss, mask, loss_agg, norm), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, loss_agg: str = "token-mean",
               norm: LossNorm | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2), aggregated like the policy loss."""
    norm = LossNorm.of(mask) if norm is None else norm
    err = (values - returns).square()
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns).square()
        stats = {"value_clip_frac": agg_loss((err_clipped > err).float(), mask, "token-mean", norm).detach()}
        err = torch.maximum(err, err_clipped)
    else:
        stats = {"value_clip_frac": torch.zeros((), device=values.device)}
    return 0.5 * agg_loss(err, mask, loss_agg, norm), stats


# ---- controllers and running statistics -----------------------------------------------------------------

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
    """Running mean / variance (population) of rewards across steps and DP ranks: each batch's moments
    are two-pass float64 (masked_moments), merged by Chan et al.'s parallel update in float64. Before
    the first batch: mean 0, var 1 (no pseudo-count: a prior at 0 would bias the variance by
    prior * mean^2, ~0.1 at mean 1e3)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor, group=None, mask: torch.Tensor | None = None) -> None:
        """Fold in the entries of x (those where mask is true; no boolean indexing, so no device sync
        for a data-dependent shape)."""
        m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
        b_mean, b_sq_dev, n = torch.stack(masked_moments(x, m, group)).tolist()  # one host sync
        if n == 0:
            return
        if self.count == 0:
            self.mean, self.var, self.count = b_mean, b_sq_dev / n, n
            return
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_sq_dev + delta * delta * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var ** 0.5 + 1e-8)
