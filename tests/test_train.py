"""trident train: TP=2 equals TP=1 step for step, the loss goes down, bad input fails cleanly."""
import json

import pytest
import torch

from engine.cli import main
from engine.config import load_config
from engine.train import TrainConfig, lr_at, train
from tests import train_workers
from tests.distributed import run_ranks

BASE = ["--steps=10", "--micro_batch_size=4", "--grad_accum=2", "--data.seq_len=48", "--optim.warmup_steps=3",
        "--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_layers=2", "--model.num_heads=4",
        "--model.num_kv_heads=2"]


def test_tp2_matches_tp1_and_lowers_loss(tmp_path):
    ref = [m["loss"] for m in train(load_config(TrainConfig, None, BASE + [f"--out_dir={tmp_path}/tp1"]))]
    runs = [BASE + [f"--out_dir={tmp_path}/tp2", "--parallel.tp=2"],
            BASE + [f"--out_dir={tmp_path}/tp2sp", "--parallel.tp=2", "--parallel.sequence_parallel=true",
                    "--parallel.recompute=true", "--save=false"]]
    tp2, tp2sp = run_ranks(2, train_workers.train_losses, runs)[0]
    for curve in (tp2, tp2sp):
        for a, b in zip(ref, curve):
            assert abs(a - b) <= 1e-4 * abs(a), (ref, curve)
    assert tp2[-1] < tp2[0] - 0.5
    lines = [json.loads(x) for x in (tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    # the TP=2 checkpoint loads at TP=1 and continues from where it stopped
    cont = train(load_config(TrainConfig, None, BASE + [f"--init={tmp_path}/tp2/checkpoint", "--steps=1",
                                                        f"--out_dir={tmp_path}/cont", "--optim.lr=1e-9",
                                                        "--optim.warmup_steps=1", "--save=false"]))
    assert cont[0]["loss"] < ref[0] - 0.5


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig().optim
    assert lr_at(0, cfg, 100) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps, cfg, 100) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg, 100) == pytest.approx(cfg.min_lr)


@pytest.mark.parametrize("case,expect", [
    ("empty", "empty"),
    ("vocab", "vocab"),
    ("tp", "does not divide num_heads"),
    ("key", "unknown config key"),
    ("world", "not divisible"),
])
def test_bad_input_one_line_error_no_run_dir(tmp_path, capsys, case, expect, monkeypatch):
    args = ["train", f"--out_dir={tmp_path}/run", "--steps=1"]
    if case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args.append(f"--data.path={tmp_path}/empty.jsonl")
    elif case == "vocab":
        args.append("--model.vocab_size=100")  # the shipped tokenizer has 367 tokens
    elif case == "tp":
        args.append("--model.num_heads=3")
        monkeypatch.setenv("WORLD_SIZE", "2")
        args += ["--model.hidden_size=96", "--parallel.tp=2"]
    elif case == "key":
        args.append("--optim.learning_rate=1")
    elif case == "world":
        args.append("--parallel.tp=4")
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expect in err, err
    assert not (tmp_path / "run").exists()


# 3D parallelism: every layout takes the same 3 optimizer steps as one rank (tied embeddings split
# across the first and last stage included)
PAR_BASE = ["--steps=3", "--micro_batch_size=2", "--data.seq_len=32", "--optim.warmup_steps=1",
            "--model.hidden_size=64", "--model.intermediate_size=160", "--model.num_layers=6", "--model.num_heads=4",
            "--model.num_kv_heads=2", "--model.tie_word_embeddings=true", "--optim.clip_grad=0.5"]


def _all_tensors(path):
    from engine.checkpoint import NativeSource
    src = NativeSource(path)
    return {name: src.read(name, None, 0, 0) for name in src.index["tensors"]}


@pytest.mark.parametrize("world,dp,layout", [
    (8, 2, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.sequence_parallel=true"]),
    (4, 1, ["--parallel.pp=4", "--parallel.layer_split=[2,1,1,2]"]),
    (4, 2, ["--parallel.pp=2", "--parallel.virtual_stages=2", "--parallel.schedule=interleaved"]),
    (2, 2, []),  # pure DP: all-reduces start from the backward hooks of the last micro-batch
])
def test_3d_layouts_match_one_rank(tmp_path, world, dp, layout):
    accum = 4 // dp  # same global batch: 4 micro-batches of 2 rows per step
    ref_loss = [m["loss"] for m in train(load_config(TrainConfig, None, PAR_BASE + [
        f"--out_dir={tmp_path}/ref", "--grad_accum=4"]))]
    run = PAR_BASE + layout + [f"--out_dir={tmp_path}/par", f"--grad_accum={accum}"]
    losses = run_ranks(world, train_workers.train_losses, [run])[0][0]
    assert losses == pytest.approx(ref_loss, rel=1e-5)
    ref, par = _all_tensors(tmp_path / "ref" / "checkpoint"), _all_tensors(tmp_path / "par" / "checkpoint")
    assert ref.keys() == par.keys()
    for name in ref:
        # Adam turns reduction-order noise in near-zero gradients into ~1e-6 steps (lr 1e-3)
        torch.testing.assert_close(par[name], ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1_pp4_and_tp4_pp1(tmp_path):
    run = PAR_BASE + ["--parallel.tp=2", "--parallel.pp=2", "--grad_accum=2", "--steps=1", f"--out_dir={tmp_path}/run"]
    run_ranks(4, train_workers.train_losses, [run])
    ckpt = str(tmp_path / "run" / "checkpoint")
    ref = train_workers.layout_logits(0, 1, ckpt, 1, 1)
    for tp, pp in ((1, 4), (4, 1)):
        for logits in run_ranks(4, train_workers.layout_logits, ckpt, tp, pp):
            torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
