"""The README's demo, for real and at full size: SFT, then PPO with the verifiable reward raises
held-out accuracy; a Bradley-Terry reward model reaches >= 90% held-out pairwise accuracy, and PPO
against it raises its score on held-out prompts with the KL to the reference bounded; DPO on the same
pairs reaches >= 90% held-out preference accuracy.

Slow (several minutes on 2 cores): the configs are the shipped demo configs, only paths and step
counts are overridden, so these tests break when the demo stops working.
"""
import pytest

from engine.config import load_config
from engine.ppo import PPOConfig, ppo
from engine.rollout import vllm_available
from engine.rm import RMConfig, train_rm
from engine.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "sft"
    train(load_config(TrainConfig, "tools/configs/demo_sft.yaml", [f"--out_dir={out}"]))
    return out / "checkpoint"


@pytest.fixture(scope="module")
def reward_model(sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "rm"
    hist = train_rm(load_config(RMConfig, "tools/configs/demo_rm.yaml", [f"--init={sft}", f"--out_dir={out}"]))
    return out / "checkpoint", hist


def _evals(history, key):
    return [h[key] for h in history if key in h]


def test_ppo_with_verifiable_reward_raises_held_out_accuracy(sft, tmp_path):
    """The shipped PPO demo (loss_agg seq-mean-token-sum and clip-higher, stated again here) for 75 steps:
    the mean of the last two evals (steps 50, 75) is at least 0.25 above the SFT model's accuracy."""
    cfg = load_config(PPOConfig, "tools/configs/demo_ppo.yaml",
                      [f"--actor={sft}", f"--out_dir={tmp_path}/ppo", "--rollout.backend=native",
                       "--algo.loss_agg=seq-mean-token-sum", "--algo.clip_eps=0.2", "--algo.clip_eps_high=0.28",
                       "--steps=75", "--eval.every=25", "--export_hf=false"])
    acc = _evals(ppo(cfg), "eval_accuracy")
    assert acc[0] < 0.35  # the SFT model mostly answers with rounded estimates
    assert (acc[-1] + acc[-2]) / 2 - acc[0] >= 0.25 - 1e-6, acc


@pytest.mark.skipif(not vllm_available(), reason="vllm not installed")
def test_async_rollouts_from_a_separate_ray_actor_raise_held_out_accuracy(sft, tmp_path):
    """The PPO demo under `--launcher ray` (a trainer actor and a vLLM engine actor in placement groups
    of their own), rollouts one step ahead of training, for 20 steps (the gain comes early; evals at
    0, 10 and 20, measured 2026-12-04: 0.265, 0.52, 0.69): accuracy rises by at least 0.25, and every
    step after the first trained on the previous policy's samples (lag 1) while the engine generated
    the next batch."""
    import subprocess
    import sys
    pytest.importorskip("ray")
    from tests.multinode import history
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "ppo", "--config=tools/configs/demo_ppo.yaml",
                           f"--actor={sft}", f"--out_dir={tmp_path}/ppo", "--rollout.backend=vllm",
                           "--rollout.placement=separate", "--rollout.async=true", "--steps=20", "--eval.every=10",
                           "--export_hf=false", "--launcher=ray", "--ranks=2"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = history(tmp_path / "ppo")
    acc = _evals(lines, "eval_accuracy")
    assert acc[-1] - acc[0] >= 0.25, acc
    steps = [x for x in lines if "policy_lag" in x]
    assert [x["policy_lag"] for x in steps] == [0] + [1] * 19
    assert sum(x["overlap_saved_s"] for x in steps[1:]) > 0


def test_dpo_reaches_90_percent_held_out_preference_accuracy(sft, tmp_path):
    from engine.dpo import DPOConfig, train_dpo
    hist = train_dpo(load_config(DPOConfig, "tools/configs/demo_dpo.yaml",
                                 [f"--init={sft}", f"--out_dir={tmp_path}/dpo", "--export_hf=false"]))
    evals = [h for h in hist if "eval_accuracy" in h]
    assert evals[0]["eval_accuracy"] == 0 and evals[-1]["eval_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_margin"] > 0


def test_ppo_in_fp8_still_raises_held_out_accuracy(sft, tmp_path):
    """The PPO demo's first 75 steps, as the bf16 test above runs it, with the four models in fp8
    (decoder GEMMs in FP8, current scaling; the native sampler generates and is graded in fp8 too):
    the precision issue's +0.10, as the mean of the last two evals (measured 2026-12-04: 0.245 ->
    0.575, 0.605, 0.65 at steps 25-75; the 150-step demo from the bf16 SFT gained only +0.11)."""
    cfg = load_config(PPOConfig, "tools/configs/demo_ppo.yaml",
                      [f"--actor={sft}", f"--out_dir={tmp_path}/ppo", "--rollout.backend=native", "--precision=fp8",
                       "--steps=75", "--eval.every=25", "--export_hf=false"])
    acc = _evals(ppo(cfg), "eval_accuracy")
    assert (acc[-1] + acc[-2]) / 2 - acc[0] >= 0.1 - 1e-6, acc  # accuracies are multiples of 1/200


def test_reward_model_reaches_90_percent_pairwise_accuracy(reward_model):
    _, hist = reward_model
    assert _evals(hist, "eval_accuracy")[-1] >= 0.9


def test_ppo_against_reward_model_raises_its_score_with_bounded_kl(sft, reward_model, tmp_path):
    rm, _ = reward_model
    cfg = load_config(PPOConfig, "tools/configs/demo_ppo_rm.yaml",
                      [f"--actor={sft}", f"--critic={rm}", f"--reward.model={rm}", f"--out_dir={tmp_path}/ppo",
                       "--rollout.backend=native", "--steps=40", "--eval.every=40", "--export_hf=false"])
    hist = ppo(cfg)
    score = _evals(hist, "eval_reward")
    kl = [h["kl"] for h in hist if "kl" in h]
    assert score[-1] > score[0] + 0.1, score
    assert max(kl) < 5.0, kl
