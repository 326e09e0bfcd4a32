"""PPO math against direct definitions."""
import math

import pytest
import torch

from engine import rl_math
from tests import rl_workers
from tests.distributed import run_ranks


def _gae_loop(r, v, gamma, lam):
    """Textbook reverse loop over one sequence's real tokens (value after the end is 0)."""
    n = len(r)
    adv = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        nv = v[t + 1] if t + 1 < n else 0.0
        delta = r[t] + gamma * nv - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_equals_reverse_loop(gamma, lam):
    torch.manual_seed(1)
    b, t = 5, 9
    rewards, values = torch.randn(b, t), torch.randn(b, t)
    lengths = [9, 1, 4, 0, 7]
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])
    adv, ret = rl_math.gae(rewards * mask, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expect = _gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(expect, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0
        assert ret[i, :n].tolist() == pytest.approx((adv[i, :n] + values[i, :n]).tolist(), abs=1e-6)


def test_kl_estimators_match_definitions():
    torch.manual_seed(0)
    logp, ref = -torch.rand(100) * 3, -torch.rand(100) * 3
    for i in range(100):
        a, b = logp[i].item(), ref[i].item()
        r = math.exp(b - a)  # pi_ref / pi
        assert rl_math.kl_penalty(logp[i], ref[i], "k1").item() == pytest.approx(-math.log(r), abs=1e-5)
        assert rl_math.kl_penalty(logp[i], ref[i], "k2").item() == pytest.approx(0.5 * math.log(r) ** 2, abs=1e-5)
        assert rl_math.kl_penalty(logp[i], ref[i], "k3").item() == pytest.approx(r - 1 - math.log(r), abs=1e-5)
    # all three are unbiased / low-bias estimates of the true KL: check on a known pair of categoricals
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1 = rl_math.kl_penalty(p.log()[samples], q.log()[samples], "k1").mean().item()
    k3 = rl_math.kl_penalty(p.log()[samples], q.log()[samples], "k3").mean().item()
    assert k1 == pytest.approx(true_kl, abs=5e-3) and k3 == pytest.approx(true_kl, abs=5e-3)


def test_token_rewards_put_score_on_last_token_and_kl_everywhere():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.ones(2, 4)
    r = rl_math.token_rewards(torch.tensor([2.0, -1.0]), mask, kl, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1, 1.9, 0.0], [-1.1, 0, 0, 0]]))


def test_policy_loss_gradient_is_zero_exactly_where_clip_is_active():
    torch.manual_seed(0)
    n = 400
    old = -torch.rand(n) * 2
    logp = (old + torch.randn(n) * 0.5).requires_grad_()
    adv = torch.randn(n)
    mask = torch.ones(n)
    loss, stats = rl_math.policy_loss(logp, old, adv, mask, clip_low=0.2)
    loss.backward()
    ratio = (logp - old).exp().detach()
    active = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert active.any() and (~active).any()
    assert (logp.grad[active] == 0).all()
    assert (logp.grad[~active] != 0).all()
    assert stats["clip_frac"] == pytest.approx(active.float().mean().item())


def test_dual_clip_bounds_negative_advantage_loss():
    logp, old = torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0])  # ratio e^3 ~ 20
    adv = torch.tensor([-1.0, 1.0])
    loss, _ = rl_math.policy_loss(logp.requires_grad_(), old, adv, torch.tensor([1.0, 0.0]), 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)


def test_value_loss_clipping():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    loss, _ = rl_math.value_loss(v.requires_grad_(), old, ret, torch.ones(2), clip=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_whitening_across_two_dp_ranks_equals_concatenated():
    torch.manual_seed(0)
    x = [torch.randn(3, 7) * 2 + 1, torch.randn(5, 7) - 3]
    m = [(torch.rand(3, 7) > 0.3).float(), (torch.rand(5, 7) > 0.5).float()]
    full = rl_math.masked_whiten(torch.cat(x), torch.cat(m))
    got = run_ranks(2, rl_workers.whiten, x, m)
    assert torch.allclose(torch.cat(got), full, atol=1e-5)
    moments = rl_math.RunningMoments()
    moments.update(torch.cat([x[0].flatten(), x[1].flatten()]))
    both = run_ranks(2, rl_workers.moments, [x[0].flatten(), x[1].flatten()])
    assert both[0] == pytest.approx((moments.mean, moments.var), rel=1e-6)


def test_adaptive_kl_controller_moves_towards_target():
    c = rl_math.AdaptiveKLController(0.1, target=1.0, horizon=100)
    c.update(3.0, 10)
    assert c.value > 0.1
    c2 = rl_math.AdaptiveKLController(0.1, target=1.0, horizon=100)
    c2.update(0.1, 10)
    assert c2.value < 0.1


def test_group_advantages_match_definitions():
    torch.manual_seed(0)
    scores = torch.rand(12)
    valid = torch.ones(12, dtype=torch.bool)
    valid[5] = False  # skipped sample: out of its group's statistics, advantage 0
    grpo = rl_math.group_advantages(scores, 4, "grpo", valid)
    rloo = rl_math.group_advantages(scores, 4, "rloo", valid)
    for g in range(3):
        idx = [i for i in range(4 * g, 4 * g + 4) if valid[i]]
        r = scores[idx]
        torch.testing.assert_close(grpo[idx], (r - r.mean()) / (r.std() + 1e-6))
        for i in idx:
            others = [j for j in idx if j != i]
            torch.testing.assert_close(rloo[i], scores[i] - scores[others].mean())
    assert grpo[5] == 0 and rloo[5] == 0
    # all samples of a prompt equal: no signal
    assert torch.all(rl_math.group_advantages(torch.ones(8), 4, "grpo") == 0)
    with pytest.raises(ValueError):
        rl_math.group_advantages(scores, 5)


def test_outcome_advantages_add_reward_to_go_of_token_rewards():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    kl_rewards = torch.tensor([[-0.1, -0.2, -0.3, -9], [-0.5, -0.5, -9, -9]])
    adv = rl_math.outcome_advantages(torch.tensor([1.0, -1.0]), mask, kl_rewards)
    expected = torch.tensor([[1 - 0.6, 1 - 0.5, 1 - 0.3, 0], [-1 - 1.0, -1 - 0.5, 0, 0]])
    torch.testing.assert_close(adv, expected)
