"""Training-state checkpoints: a SIGKILLed run resumes bit-exactly (TP2 x PP2 x DP2 with ZeRO-1, under
torchrun), a checkpoint resumes into other layouts, a save killed at any point leaves the previous
checkpoint loadable and the run resumable, and broken checkpoints are refused with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import train_state
from engine.checkpoint import NativeSource

TINY = ["--micro_batch_size=2", "--data.seq_len=32", "--optim.warmup_steps=1", "--model.hidden_size=64",
        "--model.intermediate_size=160", "--model.num_layers=2", "--model.num_heads=4", "--model.num_kv_heads=2",
        "--model.tie_word_embeddings=true", "--optim.lr=3e-3", "--save=false"]
ROOT = Path(__file__).resolve().parents[1]


def trident(args, world=1, crash=None, check=True, command="train"):
    """`trident <command> ...` in fresh processes (torchrun for world > 1); crash: TRIDENT_CRASH_AT."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRIDENT_CRASH_AT", None)
    if crash:
        env["TRIDENT_CRASH_AT"] = crash
    launch = [sys.executable, "-m", "engine.cli"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m", "engine.cli"]
    proc = subprocess.run(launch + [command] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl without the timings (which differ from run to run)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if not k.endswith("_s") and k != "gen_tokens_per_s"} for x in lines]


def losses(run_dir) -> dict[int, float]:
    lines = metrics(run_dir)
    steps = [x["step"] for x in lines]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # each step once, in order
    return {x["step"]: x["loss"] for x in lines}


def tensors(path) -> dict:
    src = NativeSource(path)
    return {n: src.read(n, None, 0, 0) for n in src.tensors}


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for n in a:
        if atol == 0.0:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=n)


def step_dir(run, step):
    return Path(run) / "checkpoints" / train_state.step_name(step)


@pytest.mark.slow
def test_sigkill_resume_bit_exact_and_into_other_layouts(tmp_path):
    """TP2 x PP2 x DP2, ZeRO-1, fp32: killed after step 2, resumed from the run directory, it logs the
    same losses and ends with the same weights and optimizer state as the uninterrupted run (which
    saved asynchronously, so its checkpoints also show the host snapshot is taken at the step), bit for
    bit. The step-2 checkpoint resumes at TP1 x PP1 x DP4 and TP4 x PP2 x DP1 (same global batch of 8
    rows, same `steps`: the LR schedule's length) and takes step 3 as the original layout does, to
    round-off."""
    layout = ["--parallel.tp=2", "--parallel.pp=2", "--parallel.sequence_parallel=true", "--grad_accum=2",
              "--optim.distributed=true", "--checkpoint.save_every=1", "--checkpoint.keep_last=4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    trident(TINY + layout + ["--steps=4", f"--out_dir={full}", "--checkpoint.async_save=true"], world=8)
    crashed = trident(TINY + layout + ["--steps=4", f"--out_dir={cut}"], world=8, crash="after_step:2", check=False)
    assert crashed.returncode != 0 and (cut / "checkpoints" / "latest").read_text() == "step-00000002"
    resumed = trident(TINY + layout + ["--steps=4", f"--out_dir={cut}"], world=8)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert losses(cut) == losses(full)
    for sub in ("model", "model.optim/exp_avg", "model.optim/exp_avg_sq"):
        assert_same(tensors(step_dir(cut, 4) / sub), tensors(step_dir(full, 4) / sub))
    state = json.loads((step_dir(cut, 4) / "trainer_state.json").read_text())
    assert state["trainer"]["samples"] == 4 * 8 and state["models"]["model"]["distributed_optimizer"]

    for world, other in ((4, ["--grad_accum=1"]), (8, ["--parallel.tp=4", "--parallel.pp=2", "--grad_accum=4"])):
        out = tmp_path / f"re{world}"
        proc = trident(TINY + other + ["--steps=4", "--checkpoint.save_every=1", f"--out_dir={out}",
                                       f"--resume={step_dir(full, 2)}"], world=world)
        assert "layout changed" in proc.stdout + proc.stderr
        assert list(losses(out)) == [3, 4] and losses(out)[3] == pytest.approx(losses(full)[3], rel=1e-6)
        for sub in ("model", "model.optim/exp_avg", "model.optim/exp_avg_sq"):
            assert_same(tensors(step_dir(out, 3) / sub), tensors(step_dir(full, 3) / sub), atol=1e-6)


@pytest.mark.parametrize("point", ["save:mid_shard:4", "save:before_rename:4", "save:before_latest:4"])
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, point):
    args = TINY + ["--steps=6", "--checkpoint.save_every=2", "--checkpoint.keep_last=2", "--precision=bf16"]
    full, run = tmp_path / "full", tmp_path / "run"
    if point.endswith("mid_shard:4"):  # the uninterrupted reference, once
        trident(args + [f"--out_dir={full}"])
    crashed = trident(args + [f"--out_dir={run}"], crash=point, check=False)
    assert crashed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    assert train_state.find(run) == step_dir(run, 2)
    complete = step_dir(run, 4).exists()
    assert complete == point.startswith("save:before_latest")  # renamed only once complete
    trident(args + [f"--out_dir={run}"])  # resumes from step 2 and finishes
    assert list(losses(run)) == [1, 2, 3, 4, 5, 6] and sorted(p.name for p in (run / "checkpoints").glob("step-*")) == \
        ["step-00000004", "step-00000006"]
    if point.endswith("mid_shard:4"):
        assert losses(run) == losses(full)
        assert_same(tensors(step_dir(run, 6) / "model"), tensors(step_dir(full, 6) / "model"))
        assert_same(tensors(step_dir(run, 6) / "model.optim/master"), tensors(step_dir(full, 6) / "model.optim/master"))


def test_a_batch_in_flight_round_trips_through_a_checkpoint_file(tmp_path):
    """What async PPO saves of its next batch: tokens and float32 log-probs, empty responses included,
    come back exactly; a checkpoint without the file holds none; a broken file is refused."""
    from engine.errors import CheckpointError
    from engine.rollout import Rollout
    from safetensors.torch import save_file
    batch = Rollout([[5, 9, 2], [], [7]], [[-0.1, -2.5, -1e-7], [], [-3.25]])
    tensors = batch.to_tensors()
    assert tensors["tokens"].tolist() == [[5, 9, 2], [-1, -1, -1], [7, -1, -1]]
    assert train_state.read_tensors(tmp_path) == {}
    save_file(tensors, str(tmp_path / train_state.TENSORS_FILE))
    back = train_state.read_tensors(tmp_path)
    again = Rollout.from_tensors(back["tokens"], back["logprobs"])
    assert again.responses == batch.responses
    assert again.logprobs == [torch.tensor(lp, dtype=torch.float32).tolist() for lp in batch.logprobs]
    (tmp_path / train_state.TENSORS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="trainer_tensors.safetensors is not readable"):
        train_state.read_tensors(tmp_path)


def test_broken_checkpoints_are_refused_with_one_line(tmp_path):
    run = tmp_path / "run"
    trident(TINY + ["--steps=1", f"--out_dir={run}", "--checkpoint.at_end=true"])
    ck = step_dir(run, 1)
    # another model's checkpoint
    bad = trident(TINY + ["--steps=2", f"--out_dir={tmp_path}/b", f"--resume={ck}", "--model.hidden_size=32"],
                  check=False)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and "another model" in err[0] and "trident_index.json" in err[0], err
    # a truncated shard
    shard = ck / "model.optim" / "exp_avg" / "tp00-pp00.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    bad = trident(TINY + ["--steps=2", f"--out_dir={tmp_path}/c", f"--resume={ck}"], check=False)
    err = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(err) == 1 and str(shard) in err[0], err
    # nothing there
    bad = trident(TINY + ["--steps=2", f"--out_dir={tmp_path}/d", f"--resume={tmp_path}/nope"], check=False)
    assert bad.returncode == 2 and "no such directory" in bad.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_weights_only_checkpoint_starts_fresh_optimizer_state(tmp_path):
    run = tmp_path / "run"
    trident(TINY + ["--steps=2", f"--out_dir={run}", "--save=true"])
    proc = trident(TINY + ["--steps=1", f"--out_dir={tmp_path}/w", f"--resume={run}/checkpoint"])
    assert "weights-only checkpoint" in proc.stdout + proc.stderr
    assert losses(tmp_path / "w")[1] < losses(run)[1]  # the trained weights were loaded


def ppo_args(actor, out, *extra):
    return [f"--actor={actor}", "--rollout.backend=native", "--steps=4", "--rollout.prompts_per_step=8",
            "--rollout.samples_per_prompt=2",
            "--rollout.max_new_tokens=4", "--eval.limit=8", "--eval.every=2", f"--out_dir={out}",
            "--algo.micro_batch_size=4", "--algo.minibatches=2", "--algo.epochs=2", "--algo.kl_target=0.05",
            "--algo.normalize_rewards=true", "--algo.ptx_coef=0.2", "--algo.ptx_data=data/arith_sft.jsonl",
            "--actor_lr=1e-3", "--critic_lr=1e-3", "--export_hf=false", "--checkpoint.save_every=2", *extra]


@pytest.mark.slow
def test_ppo_sigkill_resume_bit_exact_tp2_native(actor, tmp_path):
    """PPO at TP2 with the native sampler (actor, critic, both optimizers, the adaptive KL controller,
    reward moments, prompt / minibatch order and the PPO-ptx stream): killed after step 2 and resumed,
    it logs the same metrics and ends with the same actor and critic as the uninterrupted run."""
    args = ppo_args(actor, tmp_path / "full", "--parallel.tp=2", "--distributed_optimizer=true")
    trident(args, world=2, command="ppo")
    cut = ppo_args(actor, tmp_path / "cut", "--parallel.tp=2", "--distributed_optimizer=true")
    assert trident(cut, world=2, command="ppo", crash="after_step:2", check=False).returncode != 0
    trident(cut, world=2, command="ppo")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    for sub in ("actor", "actor.optim/exp_avg", "critic", "critic.optim/exp_avg_sq"):
        assert_same(tensors(step_dir(tmp_path / "cut", 4) / sub), tensors(step_dir(tmp_path / "full", 4) / sub))


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_rm_and_dpo_sigkill_resume_bit_exact(tmp_path, command):
    """The pair order (a permutation redrawn when it runs out) and the model's training state resume:
    killed after step 2, the run logs the uninterrupted run's metrics and ends with its weights."""
    trident(TINY + ["--steps=1", f"--out_dir={tmp_path}/policy", "--save=true"])
    args = [f"--init={tmp_path}/policy/checkpoint", "--steps=4", "--batch_pairs=64", "--eval_every=2",
            "--checkpoint.save_every=2", "--micro_batch_pairs=32"] + (["--export_hf=false"] if command == "dpo" else [])
    trident(args + [f"--out_dir={tmp_path}/full"], command=command)
    cut = args + [f"--out_dir={tmp_path}/cut"]
    assert trident(cut, command=command, crash="after_step:2", check=False).returncode != 0
    trident(cut, command=command)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    assert_same(tensors(step_dir(tmp_path / "cut", 4) / "model"), tensors(step_dir(tmp_path / "full", 4) / "model"))
