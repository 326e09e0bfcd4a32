"""trident plan ppo (tools/perf_rlhf.py): the PPO step model against hand-counted bytes and FLOPs, the
placement search, and bad input. Pure arithmetic; the model against measured `bench ppo --size L`
phases is `trident plan ppo --calibrate` (README)."""
import json
from dataclasses import replace

import pytest

from engine.errors import ConfigError
from tools import plan
from tools.perf_model import GPUS, Layout, Shape, predict
from tools.perf_rlhf import EngineCalibration, PPOJob, generation, plan_ppo, sync, training

LLAMA7B = Shape(4096, 32, 32, 32, 11008, 32000, 2048)
H100 = GPUS["h100-sxm"]


def _job(rollouts=1024, **kw) -> PPOJob:
    return PPOJob(LLAMA7B, LLAMA7B, LLAMA7B, rollouts, 1024, 1024, **kw)


def test_decode_of_one_sequence_is_the_weight_read_plus_the_engine_step():
    """Batch 1 on one H100: every decode step reads the 16-bit weights (and a little KV cache) at
    bw_eff of HBM bandwidth, plus the engine's fixed step cost; prefill is compute at gemm_eff."""
    cal = EngineCalibration()
    g = generation(_job(rollouts=1), 1, 1, H100, cal)
    weights = (32 * LLAMA7B.layer_matmul_params + 4096 * 32000) * 2
    kv = 2 * 32 * 4096 * 2 * (1024 + 512)  # bytes per token x the mean context
    step = (weights + kv) / (H100.hbm_tbps * 1e12 * cal.bw_eff) + cal.step_s
    assert g["decode_bound"] == "memory" and g["waves"] == 1
    assert g["decode_step_s"] == pytest.approx(step, rel=1e-9)
    prefill = (2 * 32 * LLAMA7B.layer_matmul_params * 1024 + 2 * 1024 ** 2 * 4096 * 32 + 2 * 4096 * 32000) \
        / (H100.bf16_tflops * 1e12 * cal.gemm_eff)
    assert g["gen_s"] == pytest.approx(prefill + 1024 * step, rel=1e-9)


def test_large_batches_turn_compute_bound_and_overflow_the_kv_cache_into_waves():
    """Short sequences with GQA: thousands fit at once and decode turns compute-bound; more than the
    KV cache holds run in waves, and TP (weights and KV heads split) needs fewer of them."""
    gqa = replace(LLAMA7B, kv_heads=8)
    job = PPOJob(gqa, gqa, gqa, 8192, 128, 128)
    cal = EngineCalibration()
    big, small = generation(job, 1, 1, H100, cal), generation(replace(job, rollouts=8), 1, 1, H100, cal)
    assert big["decode_bound"] == "compute" and small["decode_bound"] == "memory"
    assert big["waves"] == 5 and big["batch_per_engine"] == 1639  # ceil(8192 / 5)
    assert big["gen_s"] > 30 * small["gen_s"]  # 1024x the sequences, batched
    assert generation(job, 8, 1, H100, cal)["waves"] == 1


def test_sync_sends_each_byte_once_from_its_owner():
    """Every engine GPU receives its 1/tp_g share; a training rank sends its 1/(tp pp) slice to each
    engine; the busiest link bounds the time: NVLink on one node, the fabric across nodes."""
    cal = replace(EngineCalibration(), sync_fixed_s=0.0)
    total = LLAMA7B.params * 2
    lay = Layout(8, 1, 4, 1)
    assert sync(_job(), lay, 2, 1, H100, cal, True) == pytest.approx(total / 2 / (H100.nvlink_gbps * 1e9))
    assert sync(_job(), lay, 2, 16, H100, cal, False) == pytest.approx(16 * total / 8 / (H100.net_gbps * 1e9))


def test_scoring_counts_the_forward_passes_ppo_runs():
    """ref + reward + the actor's old log-probs (the critic's values come from its first update pass);
    one more forward when they cannot (two epochs), one fewer with old log-probs from the engine."""
    lay = Layout(8, 1, 8, 1)
    fwd = predict(replace(LLAMA7B, seq=2048), lay, 1024, H100, forward_only=True)["step_s"]
    assert training(_job(), lay, H100)["score_s"] == pytest.approx(3 * fwd)
    assert training(_job(epochs=2), lay, H100)["score_s"] == pytest.approx(4 * fwd)
    assert training(_job(old_logprobs="rollout"), lay, H100)["score_s"] == pytest.approx(2 * fwd)
    step = predict(replace(LLAMA7B, seq=2048), lay, 512, H100)["step_s"]
    assert training(_job(epochs=2, minibatches=2), lay, H100)["train_s"] == pytest.approx(8 * step)


def test_search_recommends_a_placement_and_explains_it(capsys):
    ranked = plan_ppo(_job(), 64, H100)
    assert [r["step_s"] for r in ranked] == sorted(r["step_s"] for r in ranked)
    assert {r["placement"] for r in ranked} == {"colocated", "separate"}
    for r in ranked:
        assert r["gen_gpus"] + (0 if r["placement"] == "colocated" else r["train_gpus"]) == 64
        assert r["train_memory_gib"] <= 0.95 * H100.hbm_gib
        assert r["overlapped_step_s"] <= r["step_s"] + 1e-12
        if r["placement"] == "separate":  # whole nodes each once the job spans nodes
            assert r["gen_gpus"] % 8 == 0 and r["train_gpus"] % 8 == 0
            # async rollouts: the next batch generates under scoring + training + the weights' transfer
            fixed = EngineCalibration().sync_fixed_s
            assert r["overlapped_step_s"] == pytest.approx(
                max(r["gen_s"], r["score_s"] + r["train_s"] + r["sync_s"] - fixed) + fixed)
    # synchronous PPO leaves separate GPUs idle half the step: colocated wins
    assert ranked[0]["placement"] == "colocated"
    assert plan.main(["ppo", "--hidden", "4096", "--layers", "32", "--heads", "32", "--ffn", "11008",
                      "--vocab", "32000", "--gpus", "64", "--rollouts", "1024"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step_s"] == pytest.approx(ranked[0]["step_s"]) and "faster than the best separate" in out["why"]


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "1", "--gpu", "a100-40gb"], "needs 3"),  # ... GiB per GPU, ... over
    (["--gpus", "8", "--gpu", "b200"], "unknown --gpu 'b200'"),
    (["--gpus", "8", "--minibatches", "3"], "does not divide into 3 minibatches"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--layers", "30", "--pp", "4"], "unrecognized"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    base = ["ppo", "--hidden", "4096", "--layers", "32", "--heads", "32", "--ffn", "14336", "--vocab", "128256",
            "--rollouts", "1024"]
    try:
        rc = plan.main(base + argv)
    except SystemExit as e:  # argparse: an unknown option
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err.splitlines()[-1], err


def test_training_that_fits_nowhere_says_by_how_much():
    with pytest.raises(ConfigError, match=r"needs [\d.]+ GiB per GPU, [\d.]+ GiB over"):
        plan_ppo(_job(), 1, GPUS["a100-40gb"])
