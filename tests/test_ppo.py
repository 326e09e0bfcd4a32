"""trident ppo end to end on a tiny random policy: TP=2 runs, metrics are complete, bad input is handled."""
import json

import pytest

from engine.cli import main
from engine.config import load_config
from engine.ppo import PPOConfig, ppo
from tests import train_workers
from tests.distributed import run_ranks

STEP_KEYS = {"step", "reward_mean", "kl", "policy_loss", "value_loss", "entropy", "clip_frac",
             "gen_tokens_per_s", "sync_s", "gen_s", "train_s", "score_s", "skipped_samples"}


def _args(actor, out, *extra):
    return [f"--actor={actor}", "--rollout.backend=native", "--steps=2", "--rollout.prompts_per_step=8",
            "--rollout.max_new_tokens=4", "--eval.limit=8", "--eval.every=2", f"--out_dir={out}",
            "--algo.micro_batch_size=4", "--algo.minibatches=2", "--algo.epochs=2", *extra]


def test_ppo_tp2_runs_and_writes_everything(actor, tmp_path):
    hist = run_ranks(2, train_workers.ppo_history, _args(actor, tmp_path / "run", "--parallel.tp=2",
                                                        "--algo.kl_mode=loss", "--algo.kl_estimator=k3",
                                                        "--algo.dual_clip=3.0", "--algo.kl_target=0.1",
                                                        '--reward.rules={"tests.ppo_rewards:text_length": 1.0}'))
    timing = {"gen_tokens_per_s", "sync_s", "gen_s", "score_s", "train_s", "step_s"}
    strip = [[{k: v for k, v in h.items() if k not in timing} for h in rank] for rank in hist]
    assert strip[0] == strip[1]  # every TP rank sees the same rollout and the same statistics
    steps = [h for h in hist[0] if "reward_mean" in h]
    assert len(steps) == 2 and STEP_KEYS <= set(steps[0])
    assert steps[1]["kl"] != 0 and steps[0]["policy_loss"] != 0
    assert [h["step"] for h in hist[0] if "eval_accuracy" in h] == [0, 2]
    out = tmp_path / "run"
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "hf" / "config.json").is_file() and (out / "actor" / "trident_index.json").is_file()


@pytest.mark.parametrize("rule", ["tests.ppo_rewards:raises_on_odd", "tests.ppo_rewards:nan_on_odd"])
def test_bad_reward_samples_are_skipped_and_counted(actor, tmp_path, rule):
    cfg = load_config(PPOConfig, None, _args(actor, tmp_path / "r", "--steps=1", "--eval.path=null",
                                             "--export_hf=false", f'--reward.rules={{"{rule}": 1.0}}'))
    line = ppo(cfg)[0]
    assert 0 < line["skipped_samples"] < 8
    assert line["reward_mean"] == pytest.approx(1.0 if "raises" in rule else 0.5)


def test_prompt_too_long_is_skipped_and_empty_file_is_an_error(actor, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" +
                       json.dumps({"prompt": "9 " * 200, "answer": "9"}) + "\n")
    cfg = load_config(PPOConfig, None, _args(actor, tmp_path / "r", "--steps=1", "--eval.path=null",
                                             "--export_hf=false", f"--rollout.prompts={prompts}"))
    assert ppo(cfg)[0]["skipped_prompts"] == 1
    (tmp_path / "empty.jsonl").write_text("")
    capsys.readouterr()
    code = main(["ppo", *_args(actor, tmp_path / "e", f"--rollout.prompts={tmp_path}/empty.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "empty" in err
    assert not (tmp_path / "e").exists()


def test_reward_model_training_learns_and_saves(actor, tmp_path):
    from engine.rm import RMConfig, train_rm
    cfg = load_config(RMConfig, None, [f"--init={actor}", "--steps=30", "--batch_pairs=8", "--eval_every=30",
                                       f"--out_dir={tmp_path}/rm", "--optim.lr=1e-3"])
    hist = train_rm(cfg)
    first, last = (sum(h["loss"] for h in part) / 5 for part in (hist[:5], hist[-5:]))
    assert last < first and "eval_accuracy" in hist[-1]
    assert (tmp_path / "rm" / "checkpoint" / "trident_index.json").is_file()
    from engine.checkpoint import NativeSource
    assert NativeSource(tmp_path / "rm" / "checkpoint").config.value_head


def test_group_advantage_runs_without_critic_and_checks_its_config(actor, tmp_path, capsys):
    args = _args(actor, tmp_path / "g", "--steps=2", "--eval.path=null", "--export_hf=false",
                 "--algo.advantage=rloo", "--rollout.samples_per_prompt=4", "--algo.old_logprobs=rollout",
                 '--reward.rules={"tests.ppo_rewards:text_length": 1.0}')
    steps = ppo(load_config(PPOConfig, None, args))
    assert len(steps) == 2 and "value_loss" not in steps[0] and steps[1]["kl"] != 0
    assert steps[0]["response_len"] > 0
    capsys.readouterr()
    code = main(["ppo", *_args(actor, tmp_path / "bad", "--algo.advantage=grpo")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "samples_per_prompt" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("options", [
    [],
    ["--algo.loss_agg=seq-mean-token-mean", "--algo.clip_eps_high=0.28", "--algo.kl_mode=loss",
     "--algo.kl_estimator=k3", "--algo.log_ratio_clamp=5", "--algo.kl_target=0.05",
     "--algo.kl_controller_input=token-mean", "--distributed_optimizer=true"],
    ["--algo.advantage=reinforce_pp_baseline", "--rollout.samples_per_prompt=2", "--algo.loss_agg=seq-mean-token-sum",
     "--algo.clip_eps_low=0.1", "--algo.kl_estimator=k2"],
], ids=["default", "seq-mean-token-mean+clip-higher+kl-loss+zero1", "reinforce_pp_baseline+seq-mean-token-sum"])
def test_data_parallel_ppo_matches_one_rank(actor, tmp_path, options):
    """DP=2 (each rank its half of the rollout, statistics and losses over both, gradients summed by
    DDP) gives one rank's statistics step for step. The micro-batches split differently (one rank: 3 + 3
    + 2 rows; each DP rank: 3 + 1), so the losses must be the minibatch's aggregate, not means of means."""
    args = _args(actor, tmp_path / "x", "--eval.path=null", "--export_hf=false",
                 '--reward.rules={"tests.ppo_rewards:text_length": 1.0}', "--actor_lr=1e-3", "--critic_lr=1e-3",
                 "--steps=3", "--algo.epochs=1", "--algo.minibatches=1", "--algo.micro_batch_size=3", *options)
    one = ppo(load_config(PPOConfig, None, args))
    two = run_ranks(2, train_workers.ppo_history, args)
    keys = ["reward_mean", "kl", "kl_per_token", "kl_coef", "policy_loss", "entropy", "clip_frac", "response_len"]
    keys += ["value_loss"] if "value_loss" in one[0] else []
    for rank in two:
        for a, b in zip(one, rank):
            for k in keys:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    assert one[2]["kl"] != 0


def test_fused_values_equal_a_separate_critic_scoring_pass(actor, tmp_path, monkeypatch):
    """With one on-policy update the critic's update pass supplies the old values (no critic scoring
    pass); the run is the same as with the scoring pass, step for step."""
    import engine.ppo_trainer as ppo_module
    critic_scored = []
    real_value_step = ppo_module.value_step

    def spy():  # the critic's scoring pass is the only user of value_step
        critic_scored.append(True)
        return real_value_step()

    monkeypatch.setattr(ppo_module, "value_step", spy)
    args = _args(actor, tmp_path / "x", "--eval.path=null", "--export_hf=false",
                 '--reward.rules={"tests.ppo_rewards:text_length": 1.0}', "--actor_lr=1e-3", "--critic_lr=1e-3",
                 "--steps=3", "--algo.epochs=1", "--algo.minibatches=1", "--algo.micro_batch_size=3")
    fused = ppo(load_config(PPOConfig, None, args))
    assert critic_scored == []
    separate = ppo(load_config(PPOConfig, None, [*args, "--algo.fused_values=false", f"--out_dir={tmp_path}/y"]))
    assert critic_scored == [True] * 3
    keys = ["reward_mean", "kl", "policy_loss", "value_loss", "entropy", "clip_frac", "response_len"]
    for a, b in zip(fused, separate):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a[k], b[k])
    assert separate[2]["value_loss"] != separate[0]["value_loss"]


def test_ppo_ptx_at_dp2_matches_one_rank(actor, tmp_path):
    """PPO-ptx: the SFT loss joins the actor's gradients before the DP reduction; two DP ranks mixing
    in halves of the same rows give one rank's run, and the mix changes the run."""
    args = _args(actor, tmp_path / "x", "--eval.path=null", "--export_hf=false", "--actor_lr=1e-3",
                 '--reward.rules={"tests.ppo_rewards:text_length": 1.0}', "--steps=3", "--algo.epochs=1",
                 "--algo.minibatches=1", "--algo.micro_batch_size=8")
    ptx = [*args, "--algo.ptx_coef=0.5", "--algo.ptx_data=data/arith_sft.jsonl"]
    one = ppo(load_config(PPOConfig, None, ptx))
    two = run_ranks(2, train_workers.ppo_history, ptx)
    plain = ppo(load_config(PPOConfig, None, args))
    for rank in two:
        for a, b in zip(one, rank):
            for k in ("reward_mean", "kl", "policy_loss", "entropy"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    assert one[2]["kl"] != pytest.approx(plain[2]["kl"], rel=1e-3)
