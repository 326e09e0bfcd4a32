"""RL statistics at any offset, loss aggregations, asymmetric clip, clamps, REINFORCE++ and Dr. GRPO,
each against an independent float64 implementation of its published definition written here."""
import math

import pytest
import torch

from engine import rl_math
from tests import rl_workers
from tests.distributed import run_ranks


def _offset_data(mean: float, rows: int = 6, cols: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (mean + torch.randn(rows, cols, generator=g, dtype=torch.float64)).float()
    mask = (torch.rand(rows, cols, generator=g) > 0.3).float()
    return x, mask


def _ref_whiten(x, mask, eps=1e-8):
    """float64: (x - mean) / sqrt(unbiased var + eps) over the masked entries."""
    vals = [v for v, m in zip(x.double().flatten().tolist(), mask.flatten().tolist()) if m]
    mean = math.fsum(vals) / len(vals)
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return (x.double() - mean) / math.sqrt(var + eps) * mask.double(), mean, vals


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_whitening_and_running_moments_are_exact_at_large_offsets(offset):
    x, mask = _offset_data(offset)
    ref, mean, vals = _ref_whiten(x, mask)
    pop_var = math.fsum((v - mean) ** 2 for v in vals) / len(vals)
    # the data is hard: the one-pass float32 formula E[x^2] - E[x]^2 is far off (the old code's defect)
    xm = x * mask
    naive = ((xm * x).sum() / mask.sum() - (xm.sum() / mask.sum()) ** 2).item()
    assert abs(naive - pop_var) / pop_var > 1e-2
    torch.testing.assert_close(rl_math.masked_whiten(x, mask).double(), ref, rtol=1e-5, atol=1e-5)
    moments = rl_math.RunningMoments()
    for row, m in zip(x, mask):  # one row per step: Chan's merge across steps
        moments.update(row, mask=m)
    assert (moments.mean, moments.var) == pytest.approx((mean, pop_var), rel=1e-5)
    # two DP ranks, each holding 3 rows: the same numbers
    got = run_ranks(2, rl_workers.whiten_and_moments, [x[:3], x[3:]], [mask[:3], mask[3:]])
    torch.testing.assert_close(torch.cat([w for w, _ in got]).double(), ref, rtol=1e-5, atol=1e-5)
    for _, m in got:
        assert m == pytest.approx((mean, pop_var), rel=1e-5)


def _ref_aggregate(values, mask, mode):
    """The published definitions, sequence by sequence in float64."""
    rows = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(values.double().tolist(), mask.tolist())]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        return math.fsum(v for r in rows for v in r) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return math.fsum(math.fsum(r) / len(r) for r in rows) / len(rows)
    return math.fsum(math.fsum(r) for r in rows) / len(rows)  # seq-mean-token-sum


def _ragged_batch(rows=8, cols=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    lengths[3] = 0  # a skipped sample: no tokens, counted in no mean
    mask = (torch.arange(cols)[None] < lengths[:, None]).float()
    old = -torch.rand(rows, cols, generator=g) * 2
    logp = old + torch.randn(rows, cols, generator=g) * 0.3
    adv = torch.randn(rows, cols, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", rl_math.LOSS_AGGS)
def test_loss_aggregations_match_definitions_and_dp2_equals_one_rank(mode):
    logp, old, adv, mask = _ragged_batch()
    values = torch.randn(8, 7)
    assert rl_math.agg_loss(values, mask, mode).item() == pytest.approx(_ref_aggregate(values, mask, mode), rel=1e-6)
    # the policy loss on the whole batch at once (a clip range so wide it is never active: the plain surrogate)
    lp = logp.clone().requires_grad_()
    loss, _ = rl_math.policy_loss(lp, old, adv, mask, 0.99, 10.0, loss_agg=mode)
    loss.backward()
    surrogate = -adv * (logp - old).exp()
    assert loss.item() == pytest.approx(_ref_aggregate(surrogate, mask, mode), rel=1e-6)
    # two DP ranks, each its 4 rows in micro-batches of 3 and 1: shares add up to the same loss and gradients
    got = run_ranks(2, rl_workers.aggregated_losses, logp, old, adv, mask, 3, mode, (0.99, 10.0))
    for total, _ in got:
        assert total == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([g for _, g in got]), lp.grad, rtol=1e-6, atol=1e-8)
    # the modes differ on ragged data (so each test above checks its own formula)
    others = [rl_math.agg_loss(values, mask, m).item() for m in rl_math.LOSS_AGGS]
    assert len({round(v, 6) for v in others}) == 3


def test_asymmetric_clip_gradient_is_zero_exactly_where_each_side_is_active():
    torch.manual_seed(0)
    n = 2000
    old = -torch.rand(n) * 2
    logp = (old + torch.randn(n) * 0.4).requires_grad_()
    adv = torch.randn(n)
    loss, stats = rl_math.policy_loss(logp, old, adv, torch.ones(n), clip_low=0.2, clip_high=0.28)
    loss.backward()
    ratio = (logp - old).exp().detach()
    high_active = (adv > 0) & (ratio > 1.28)
    low_active = (adv < 0) & (ratio < 0.8)
    active = high_active | low_active
    assert high_active.sum() > 10 and low_active.sum() > 10
    assert (logp.grad[active] == 0).all() and (logp.grad[~active] != 0).all()
    # clip-higher: between 1.2 and 1.28 positive advantages still push the ratio up (symmetric clip: zero)
    between = (adv > 0) & (ratio > 1.2) & (ratio < 1.28)
    assert between.sum() > 10
    expect = -adv[between] * ratio[between] / n  # d/dlogp of -A * exp(logp - old), token mean
    torch.testing.assert_close(logp.grad[between], expect)
    assert stats["clip_frac"].item() == pytest.approx(active.float().mean().item())


def test_log_ratio_clamp_keeps_a_runaway_token_finite_and_gradient_free():
    old = torch.zeros(4)
    logp = torch.tensor([100.0, 0.1, -0.1, 0.05])  # token 0: ratio e^100 overflows float32
    adv = torch.tensor([-1.0, 1.0, -1.0, 0.5])
    mask = torch.ones(4)
    loss_free, _ = rl_math.policy_loss(logp, old, adv, mask)
    assert math.isinf(loss_free.item())
    lp = logp.clone().requires_grad_()
    loss, _ = rl_math.policy_loss(lp, old, adv, mask, log_ratio_clamp=20.0)
    loss.backward()
    # token 0 at the clamp: -A * e^20 (not inf) and no gradient; the others as without the clamp
    rest = [max(-a * math.exp(x), -a * min(max(math.exp(x), 0.8), 1.2)) for x, a in zip(logp[1:].tolist(), adv[1:].tolist())]
    assert loss.item() == pytest.approx((math.exp(20.0) + sum(rest)) / 4, rel=1e-6)
    assert lp.grad[0] == 0 and (lp.grad[1:] != 0).all()


def test_kl_clamp_bounds_the_estimate_and_its_gradient():
    logp = torch.tensor([-25.0, -0.5, 0.0]).requires_grad_()
    ref = torch.tensor([0.0, -0.2, 0.0])
    k3 = rl_math.kl_penalty(logp, ref, "k3", clamp=10.0)
    # k3 = e^(ref - logp) - 1 - (ref - logp): token 0 would be e^25 ~ 7e10
    d = (ref - logp).detach()
    expect = torch.stack([torch.tensor(10.0), d[1].exp() - 1 - d[1], torch.tensor(0.0)])
    torch.testing.assert_close(k3.detach(), expect)
    k3.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0
    assert rl_math.kl_penalty(logp, ref, "k1", clamp=10.0)[0].item() == -10.0


def _ref_group_mean_centred(scores, valid, group):
    out = []
    for g in range(0, len(scores), group):
        idx = [i for i in range(g, g + group) if valid[i]]
        mean = math.fsum(scores[i] for i in idx) / max(len(idx), 1)
        out += [(scores[i] - mean) if valid[i] and len(idx) > 1 else 0.0 for i in range(g, g + group)]
    return out


def test_dr_grpo_is_the_group_centred_score_and_single_samples_get_nothing():
    g = torch.Generator().manual_seed(0)
    scores = 1e3 + torch.rand(12, generator=g, dtype=torch.float64).float()  # a large offset too
    valid = torch.ones(12, dtype=torch.bool)
    valid[1] = False
    valid[8:11] = False  # group 3 keeps one valid sample: no baseline, no signal
    got = rl_math.group_advantages(scores, 4, "dr_grpo", valid)
    expect = _ref_group_mean_centred(scores.double().tolist(), valid.tolist(), 4)
    assert got.tolist() == pytest.approx(expect, abs=1e-6)
    assert (got[8:12] == 0).all() and got[11] == 0


def _ref_returns(rewards, mask, gamma):
    out = []
    for r, m in zip(rewards.double().tolist(), mask.tolist()):
        n = int(sum(m))
        g, row = 0.0, [0.0] * len(r)
        for t in reversed(range(n)):
            g = r[t] + gamma * g
            row[t] = g
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_reinforce_pp_whitens_discounted_returns_over_the_global_batch():
    _, _, _, mask = _ragged_batch(seed=1)
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(8, generator=g) + 5
    kl = torch.rand(8, 7, generator=g) * 0.1
    rewards = rl_math.token_rewards(scores, mask, kl, kl_coef=0.05)
    got = rl_math.reinforce_pp_advantages(rewards, mask, gamma=0.9)
    expect, _, _ = _ref_whiten(_ref_returns(rewards, mask, 0.9), mask)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
    halves = run_ranks(2, rl_workers.reinforce_pp, rewards, mask)
    torch.testing.assert_close(torch.cat(halves).double(), expect, rtol=1e-5, atol=1e-6)
    # REINFORCE++-baseline: scores centred on their group mean first (groups of 2)
    centred = rl_math.group_advantages(scores, 2, "dr_grpo", mask.sum(-1) > 0)
    expect_centred = _ref_group_mean_centred(scores.double().tolist(), (mask.sum(-1) > 0).tolist(), 2)
    assert centred.tolist() == pytest.approx(expect_centred, abs=1e-6)
