"""Device-true code: a train step, a reward-model step, a scoring pass and a PPO update at world size 1
on the `meta` device (a non-CPU device torch offers on CPU) create every tensor on that device.
tests/device_guard.py fails on the first op that makes or takes a tensor elsewhere."""
import pytest
import torch

from engine.build import build_handle
from engine.checkpoint import RandomSource
from engine.config import ModelConfig, ParallelConfig, PrecisionSettings
from engine.data import attention_mask_from_doc_ids
from parallel.optimizer import OptimConfig
from parallel.state import ParallelState
from tests.device_guard import DeviceGuard, WrongDevice

META = torch.device("meta")
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  max_position_embeddings=64)


def _handle(precision="fp32", value_head=False, device=META, optim=True, fp8_recipe="current", distributed=False):
    from parallel.precision import FP8Config
    cfg = ModelConfig(**{**vars(CFG), "value_head": value_head})
    return build_handle(RandomSource(cfg, 0), ParallelState(device=device), ParallelConfig(),
                        PrecisionSettings(precision=precision, fp8=FP8Config(recipe=fp8_recipe)),
                        OptimConfig(distributed=distributed) if optim else None, 10, ids=lambda mb: mb["input_ids"])


def _sft_batch(rows=2, seq=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, CFG.vocab_size, (rows, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq).expand(rows, seq),
            "doc_ids": torch.zeros(rows, seq, dtype=torch.long)}


@pytest.mark.parametrize("precision,recipe,zero", [("fp32", None, False), ("bf16", None, False), ("fp16", None, False),
                                                  ("fp8", "current", False), ("fp8", "delayed", False),
                                                  ("bf16", None, True), ("fp16", None, True)])
def test_train_step_stays_on_the_device(precision, recipe, zero):
    from engine.train import train_step
    handle = _handle(precision, fp8_recipe=recipe or "current", distributed=zero)
    assert all(p.device == META for p in handle.params) and handle.ddp.buffer.device == META
    if zero:
        assert handle.ddp.param_buffer.device == META
    batches = [_sft_batch(), _sft_batch()]
    with DeviceGuard(META) as guard:
        line = train_step(handle, batches)
    assert set(line) >= {"loss", "grad_norm", "lr"} and guard.syncs >= 1
    assert all(t.device == META for t in handle.optimizer.exp_avg + handle.optimizer.masters)
    if precision == "fp8":
        assert handle.fp8.scale.device == META and handle.fp8.history.device == META


def test_reward_model_step_and_scoring_stay_on_the_device():
    from engine.rm import bt_forward_step, eval_batches, pair_batch, pairwise_accuracy
    handle = _handle("bf16", value_head=True)
    pairs = [([1, 5, 6, 7, 2], [1, 5, 6, 2]), ([1, 9, 2], [1, 9, 10, 11, 2])]
    batch, held_out = pair_batch(pairs, 0), eval_batches(pairs, handle.state, 0)
    with DeviceGuard(META):
        handle.train_step(bt_forward_step(2), [batch])
        pairwise_accuracy(handle, held_out, len(pairs))


def _ppo_trainer(advantage="gae", **algo):
    from engine.ppo_trainer import PPOTrainer
    from engine.ppo_config import PPOConfig
    cfg = PPOConfig(precision="bf16")
    cfg.rollout.backend = "native"
    cfg.algo.advantage = advantage
    cfg.algo.micro_batch_size = 2
    for k, v in algo.items():
        setattr(cfg.algo, k, v)
    if advantage != "gae":
        cfg.rollout.samples_per_prompt = 2
    rm = RandomSource(ModelConfig(**{**vars(CFG), "value_head": True}), 3)
    return PPOTrainer(cfg, ParallelState(device=META), RandomSource(CFG, 1), rm_source=rm)


@pytest.mark.parametrize("advantage,algo", [
    ("gae", {}), ("gae", {"epochs": 2, "minibatches": 2, "kl_mode": "loss", "loss_agg": "seq-mean-token-sum"}),
    ("grpo", {"normalize_rewards": True}),
    ("reinforce_pp_baseline", {"loss_agg": "seq-mean-token-mean", "clip_eps_high": 0.28, "kl_controller_input": "token-mean",
                               "kl_target": 0.1})])
def test_ppo_scoring_and_update_stay_on_the_device(advantage, algo):
    from engine.experience import build_experience
    from engine.rollout import Rollout
    from parallel.handle import to_device
    trainer = _ppo_trainer(advantage, **algo)
    try:
        prompts = [[1, 5, 6], [1, 5, 6], [1, 7], [1, 7]]
        gen = Rollout([[8, 9, 2], [8, 2], [10, 11, 12], [9]], [[-1.0] * 3, [-1.0] * 2, [-1.0] * 3, [-1.0]])
        exp = build_experience(prompts, gen.responses, torch.ones(4, dtype=torch.bool), 0)
        valid, scores = torch.ones(4, dtype=torch.bool), torch.tensor([1.0, 0.0, 0.5, 0.25])
        with DeviceGuard(META) as guard:
            exp, valid, scores = to_device((exp, valid, scores), META)
            scores = scores + trainer.rm_scores(exp)
            if algo.get("normalize_rewards"):
                trainer.moments.update(scores, None, valid)
            trainer.score(exp)
            kl = trainer.advantages(exp, scores, valid)
            stats = trainer.update(exp)
            line = trainer.metrics(1, gen, scores, valid, kl, exp.action_mask, stats, {"gen_s": 0.0})
        assert exp.advantages.device == META and "policy_loss" in line and guard.syncs > 0
    finally:
        trainer.close()


def test_a_cpu_tensor_created_inside_the_step_fails():
    """The guard is not vacuous: one CPU scalar added to the loss, or a CPU grad-norm accumulator
    planted in the library, fails the step."""
    from engine.train import lm_forward_step
    handle = _handle("fp32")

    def sloppy_step(model, mb):
        out, loss_fn = lm_forward_step(model, mb)
        return out, lambda o: ((lambda r: (r[0] + torch.zeros(()), r[1]))(loss_fn(o)))

    batch = {**_sft_batch(), "num_tokens": torch.tensor(32.0)}
    with pytest.raises(WrongDevice, match="cpu"):
        with DeviceGuard(META):
            handle.train_step(sloppy_step, [batch])
    handle.optimizer.zero_grad()


def test_a_planted_cpu_accumulator_fails(monkeypatch):
    import parallel.handle as handle_mod
    from engine.train import train_step

    def old_style(grad_views, device):  # the accumulator trident had before: torch.zeros on the default (CPU) device
        total = torch.zeros((), dtype=torch.float64)
        for g in grad_views:
            total += g.double().square().sum()
        return total

    monkeypatch.setattr(handle_mod, "grad_sq_sum", old_style)
    handle, batch = _handle("fp32"), _sft_batch()
    with pytest.raises(WrongDevice, match="created a cpu tensor"):
        with DeviceGuard(META):
            train_step(handle, [batch])


def test_mask_helper_follows_its_input_device():
    doc_ids = torch.zeros(2, 8, dtype=torch.long).to(META)
    with DeviceGuard(META):
        mask = attention_mask_from_doc_ids(doc_ids)
    assert mask.device == META
