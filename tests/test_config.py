"""Configs are validated before anything starts: every value is type- and range-checked against its
dataclass field, every reference is resolved before a model or vLLM is built, and a run that fails
before its first step leaves no run directory. Each case: one `error:` line, a non-zero exit."""
import re

import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError
from engine.train import TrainConfig

DEMO_SFT = "tools/configs/demo_sft.yaml"
SMALL = ["--steps=2", "--model.hidden_size=64", "--model.intermediate_size=128", "--model.num_layers=2",
         "--model.num_heads=4", "--model.num_kv_heads=2", "--data.seq_len=32", "--micro_batch_size=2"]


def _error_lines(err: str) -> list[str]:
    """stderr without progress-bar lines (a run that stops in its first step has drawn one)."""
    return [line for line in err.strip().splitlines() if not re.search(r"\d+/\d+ \[", line)]


def _fails(capsys, argv, expect, out_dir):
    capsys.readouterr()
    assert main(argv) != 0
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], lines
    assert not out_dir.exists()


@pytest.mark.parametrize("override,expect", [
    ("--parallel.tp=two", "parallel.tp must be an integer, got 'two'"),
    ("--steps=-3", "steps must be >= 1, got -3"),
    ("--micro_batch_size=0", "micro_batch_size must be >= 1, got 0"),
    ("--optim.lr=fast", "optim.lr must be a number"),
    ("--parallel.schedule=gpipe", "parallel.schedule must be one of 1f1b, interleaved"),
    ("--precision=fp4", "precision must be one of fp32, bf16, fp16, fp8"),
    ("--loss_scale.hysteresis=0", "loss_scale.hysteresis must be >= 1"),
    ("--fp8.recipe=blockwise", "fp8.recipe must be one of delayed, current"),
    ("--data.seq_len=1000", "exceeds the model's max_position_embeddings (256)"),
    ("--model.num_layers=1.5", "model.num_layers must be an integer"),
    ("--save=maybe", "save must be true or false"),
])
def test_bad_train_values_fail_before_anything_starts(tmp_path, capsys, override, expect):
    _fails(capsys, ["train", "--config", DEMO_SFT, f"--out_dir={tmp_path}/run", override], expect, tmp_path / "run")


def test_fp8_widths_and_backends_are_checked_up_front(tmp_path, capsys):
    run = tmp_path / "run"
    _fails(capsys, ["train", *SMALL, "--precision=fp8", "--model.hidden_size=72", "--model.num_heads=4",
                    f"--out_dir={run}"], "multiples of 16", run)
    _fails(capsys, ["train", *SMALL, "--precision=fp8", "--model.intermediate_size=136", f"--out_dir={run}"],
           "intermediate_size / tp is 136", run)
    _fails(capsys, ["train", *SMALL, "--precision=fp8", "--fp8.backend=te", f"--out_dir={run}"],
           "fp8.backend=te needs transformer_engine", run)


def test_fp16_scale_below_its_minimum_stops_the_run(tmp_path, capsys):
    """A scale that overflows at once and may not back off: the first step stops the run, and nothing
    is left on disk; later in a run the same stop leaves the metrics but no checkpoint."""
    run = tmp_path / "run"
    collapse = ["--precision=fp16", "--loss_scale.initial=1e12", "--loss_scale.min=1e12", "--loss_scale.hysteresis=1"]
    _fails(capsys, ["train", *SMALL, *collapse, f"--out_dir={run}"], "loss scale would fall below loss_scale.min", run)
    capsys.readouterr()
    later = ["--precision=fp16", "--loss_scale.initial=1e12", "--loss_scale.min=2.5e11", "--loss_scale.hysteresis=1"]
    assert main(["train", *SMALL, *later, "--steps=4", f"--out_dir={run}"]) != 0
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "loss_scale.min" in lines[0]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not (run / "checkpoint").exists()  # 1e12 -> 5e11 -> 2.5e11 skipped, then stop


def test_old_dtype_key_is_still_accepted(tmp_path):
    cfg = load_config(TrainConfig, None, ["--dtype=bf16"])
    assert cfg.precision == "bf16"
    path = tmp_path / "c.yaml"
    path.write_text("dtype: fp16\nsteps: 3\n")
    assert load_config(TrainConfig, str(path)).precision == "fp16"


def test_ppo_unknown_reward_rule_fails_before_vllm_starts(tmp_path, capsys, monkeypatch):
    import engine.rollout

    def no_engine(*a, **k):
        raise AssertionError("the generation engine was started")

    monkeypatch.setattr(engine.rollout.VLLMRollout, "__init__", no_engine)
    monkeypatch.setattr(engine.rollout.NativeRollout, "__init__", no_engine)
    run = tmp_path / "run"
    _fails(capsys, ["ppo", "--config", "tools/configs/demo_ppo.yaml", '--reward.rules={"nope": 1.0}',
                    f"--out_dir={run}"], "unknown reward rule 'nope'", run)
    _fails(capsys, ["ppo", "--config", "tools/configs/demo_ppo.yaml", '--eval.rules={"nope:fn": 1.0}',
                    f"--out_dir={run}"], "cannot import reward rule 'nope:fn'", run)
    _fails(capsys, ["ppo", "--config", "tools/configs/demo_ppo.yaml", "--rollout.top_p=1.5", f"--out_dir={run}"],
           "rollout.top_p must be >= 0 and <= 1, got 1.5", run)
    _fails(capsys, ["ppo", "--config", "tools/configs/demo_ppo.yaml", "--actor=/nonexistent", f"--out_dir={run}"],
           "/nonexistent", run)


@pytest.mark.parametrize("override,expect", [
    ("--algo.clip_eps_low=1.0", "algo.clip_eps_low must be > 0 and < 1, got 1.0"),
    ("--algo.clip_eps_high=-0.1", "algo.clip_eps_high must be > 0"),
    ("--algo.dual_clip=0.5", "algo.dual_clip must be > 1"),
    ("--algo.loss_agg=seq-sum", "algo.loss_agg"),
    ("--algo.kl_controller_input=sum", "algo.kl_controller_input"),
    ("--algo.advantage=dr_grpo", "algo.advantage=dr_grpo needs rollout.samples_per_prompt >= 2"),
    ("--algo.log_ratio_clamp=0", "algo.log_ratio_clamp must be > 0"),
])
def test_ppo_bad_algorithm_options_fail_before_anything_starts(tmp_path, capsys, override, expect):
    run = tmp_path / "run"
    _fails(capsys, ["ppo", "--config", "tools/configs/demo_ppo.yaml", override, f"--out_dir={run}"], expect, run)


def test_rm_bad_values(tmp_path, capsys):
    run = tmp_path / "run"
    _fails(capsys, ["rm", "--config", "tools/configs/demo_rm.yaml", "--batch_pairs=0", f"--out_dir={run}"],
           "batch_pairs must be >= 1", run)


@pytest.mark.parametrize("overrides,world,expect", [
    (["--rollout.async=true"], 2, "rollout.async overlaps generation with training: it needs rollout.placement=separate"),
    (["--rollout.engines=3"], 3, "rollout.prompts_per_step (128) must divide by rollout.engines (3)"),
    (["--rollout.engines=2"], 3, "3 ranks do not split evenly over rollout.engines=2 colocated engines"),
    (["--rollout.placement=separate", "--rollout.engines=2"], 2, "2 ranks leave none to train beside"),
    (["--rollout.placement=separate", "--rollout.transfer=shm"], 2, "rollout.transfer=shm needs colocated engines"),
    (["--rollout.placement=separate", "--parallel.tp=2"], 2, "1 training ranks are not divisible by tp*pp = 2*1"),
    (["--rollout.backend=native", "--rollout.engines=2"], 2, "are for rollout.backend=vllm"),
])
def test_rollout_placement_is_checked_before_anything_starts(overrides, world, expect):
    from engine.ppo import PPOConfig
    from engine.ppo_config import check_placement
    cfg = load_config(PPOConfig, "tools/configs/demo_ppo.yaml", ["--rollout.backend=vllm", *overrides])
    with pytest.raises(ConfigError, match=re.escape(expect)):
        check_placement(cfg, world)


def test_separate_placement_counts_the_engine_ranks_and_async_is_the_yaml_key():
    from engine.ppo import PPOConfig
    from engine.ppo_config import check_placement
    cfg = load_config(PPOConfig, "tools/configs/demo_ppo.yaml",
                      ["--rollout.backend=vllm", "--rollout.placement=separate", "--rollout.engines=2",
                       "--rollout.vllm_tp=2", "--rollout.async=true"])
    assert cfg.rollout.async_ and check_placement(cfg, 6) == 4
    with pytest.raises(ConfigError, match="unknown config key 'rollout.asynch'"):
        load_config(PPOConfig, None, ["--rollout.asynch=true"])
