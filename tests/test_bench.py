"""`trident bench train` on a tiny model: runs end to end and ends with one JSON line of positive numbers."""
import json

import pytest

from tools import bench


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_train_tiny_vs_transformers(capsys, precision):
    assert bench.main(["train", "--size", "tiny", "--steps", "2", "--warmup", "1", "--precision", precision,
                       "--compare", "hf", "--peak-n", "256"]) == 0
    res = _last_json(capsys)
    for key in ("tokens_per_s", "tflops", "mfu", "peak_tflops", "hf_tokens_per_s", "ratio", "flops_per_token"):
        assert res[key] > 0, key
    assert res["precision"] == precision and res["size"] == "tiny" and list(res["precisions"]) == [precision]
    # same weights and batch on both sides: the first losses agree
    assert abs(res["first_loss"] - res["first_loss_hf"]) < (1e-4 if precision == "fp32" else 2e-2)


def test_bench_train_fp16_and_fp8_against_bf16_and_transformers(capsys):
    """Each precision is timed with the handle that trains, against bf16 and transformers in one run."""
    assert bench.main(["train", "--size", "tiny", "--hidden", "64", "--ffn", "192", "--steps", "2", "--warmup", "1",
                       "--precision", "fp16,fp8", "--compare", "hf", "--peak-n", "256"]) == 0
    res = _last_json(capsys)
    assert list(res["precisions"]) == ["fp16", "fp8", "bf16"] and res["fp8_peak_tflops"] > 0
    for p in ("fp16", "fp8"):
        s = res["precisions"][p]
        assert s["ratio_vs_bf16"] > 0 and s["ratio_vs_hf"] > 0 and s["mfu"] > 0
        assert abs(s["first_loss"] - res["first_loss_hf"]) < 5e-2, (p, s["first_loss"], res["first_loss_hf"])
    assert "ratio_vs_bf16" not in res["precisions"]["bf16"]


def test_bench_train_rejects_bad_precision_and_fp8_widths(capsys):
    assert bench.main(["train", "--size", "tiny", "--precision", "fp4"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert bench.main(["train", "--size", "tiny", "--hidden", "72", "--precision", "fp8"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_bench_train_explicit_dims(capsys):
    assert bench.main(["train", "--size", "tiny", "--hidden", "32", "--layers", "1", "--heads", "2", "--seq", "16",
                       "--batch", "1", "--steps", "1", "--warmup", "1", "--peak-n", "128"]) == 0
    res = _last_json(capsys)
    assert res["dims"]["hidden"] == 32 and res["tokens_per_step"] == 16
    assert res["tokens_per_s"] > 0 and res["mfu"] > 0 and "ratio" not in res


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["train", "--help"])
    assert e.value.code == 0
    assert "--compare" in capsys.readouterr().out


# ---- the fast kernels the bench exercises keep the reference math (fwd and bwd) -----------------------

def _compare(fast, ref, inputs, grad_out, tol):
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ya, yb = fast(*a), ref(*b)
    ya.backward(grad_out)
    yb.backward(grad_out)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    scale = yb.float().abs().max()
    assert (ya.float() - yb.float()).abs().max() <= tol * scale
    for x, y in zip(a, b):
        if x.requires_grad:
            assert (x.grad.float() - y.grad.float()).abs().max() <= tol * y.grad.float().abs().max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_match_reference(dtype):
    import torch

    from kernels.rmsnorm import rms_norm, rms_norm_reference
    from kernels.rope import apply_rope, apply_rope_reference, inv_frequencies, rope_cos_sin
    from kernels.swiglu import swiglu, swiglu_reference

    dt = getattr(torch, dtype)
    tol = 1e-5 if dt == torch.float32 else 2e-2
    x, w = torch.randn(2, 7, 64, dtype=dt) * 3, (torch.randn(64) * 0.5 + 1).to(dt)
    _compare(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_reference(x, w, 1e-5),
             [x.requires_grad_(), w.requires_grad_()], torch.randn(2, 7, 64, dtype=dt), tol)
    _compare(swiglu, swiglu_reference, [torch.randn(2, 7, 96, dtype=dt, requires_grad=True)],
             torch.randn(2, 7, 48, dtype=dt), tol)
    b, s, h, d = 2, 7, 4, 16
    cos, sin = rope_cos_sin(torch.arange(s).expand(b, s) + 3, inv_frequencies(d, 10000.0), dt)

    def q_of(f):  # q as the model makes it: a transposed view into the fused qkv projection
        return lambda qkv: f(qkv[..., :h * d].view(b, s, h, d).transpose(1, 2), cos, sin)
    _compare(q_of(apply_rope), q_of(apply_rope_reference), [torch.randn(b, s, 3 * h * d, dtype=dt, requires_grad=True)],
             torch.randn(b, h, s, d, dtype=dt), tol)


def test_bench_ppo_native_tiny_reports_every_phase(capsys):
    assert bench.main(["ppo", "--size", "tiny", "--backend", "native", "--prompt-len", "8", "--steps", "1",
                       "--warmup", "0"]) == 0
    res = _last_json(capsys)
    assert res["backend"] == "native" and res["dims"]["prompt_len"] == 8
    parts = res["gen_s"] + res["sync_s"] + res["score_s"] + res["train_s"]
    assert res["step_s"] == pytest.approx(parts, rel=1e-3) and min(res["gen_s"], res["score_s"], res["train_s"]) > 0
    assert res["speedup_vs_trl"] == pytest.approx(res["trl_step_s"] / res["step_s"], rel=1e-2)


def test_bench_precision_smoke(capsys, tmp_path):
    """The precision benchmark end to end on 5 SFT steps (the reported numbers use the full demo)."""
    assert bench.main(["precision", "--precisions", "fp16", "--steps", "5", "--out", str(tmp_path)]) == 0
    res = _last_json(capsys)
    assert list(res["sft"]) == ["bf16", "fp16"]
    fp16 = res["sft"]["fp16"]
    assert fp16["steps"] == 5 and 0 <= fp16["held_out_accuracy"] <= 1 and "loss_vs_bf16" in fp16
    assert abs(fp16["loss_vs_bf16"]) < 0.05  # 5 steps from one init barely diverge
    assert bench.main(["precision", "--precisions", "fp4"]) == 2


def test_bench_memory_matches_megatron_formula():
    """Bytes per rank the handle really holds (bf16): 18 per parameter with DDP, 6 + 12/dp with ZeRO-1."""
    from tools.bench_memory import run
    res = run("tiny", (1, 2), "bf16")
    by = {(r["zero"], r["dp"]): r for r in res["rows"]}
    for r in res["rows"]:
        assert abs(r["measured_over_formula"] - 1) < 0.10, r
    assert by[(True, 2)]["optimizer_bytes"] < 0.55 * by[(False, 2)]["optimizer_bytes"]
    assert by[(False, 2)]["optimizer_bytes"] == by[(False, 1)]["optimizer_bytes"]
