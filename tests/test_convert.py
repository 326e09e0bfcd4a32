"""HF -> native (any TP x PP) -> HF is bit-exact; the export loads in transformers; bad input fails cleanly."""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.checkpoint import INDEX, NativeSource
from engine.cli import main
from tests.hf_models import hf_logits, save_hf_model


def _tensors(d):
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch,tp,pp", [("llama", 2, 1), ("mistral", 4, 2), ("qwen2", 2, 2)])
def test_roundtrip_bit_exact_and_loads_in_transformers(tmp_path, arch, tp, pp):
    hf = save_hf_model(arch, tmp_path / "hf")
    assert main(["convert", "hf-to-native", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nat"),
                 "--tp", str(tp), "--pp", str(pp)]) == 0
    index = json.loads((tmp_path / "nat" / INDEX).read_text())
    assert index["layout"] == {"tp": tp, "pp": pp, "stages": index["layout"]["stages"]}
    assert len(list((tmp_path / "nat").glob("tp*-pp*.safetensors"))) == tp * pp
    assert main(["convert", "native-to-hf", "--ckpt", str(tmp_path / "nat"), "--out", str(tmp_path / "back")]) == 0
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        assert torch.equal(before[name], after[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_native_pieces_cover_each_tensor_once(tmp_path):
    save_hf_model("mistral", tmp_path / "hf")  # 1 KV head at TP 4: replicated, must be stored once
    main(["convert", "hf-to-native", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nat"), "--tp", "4"])
    src = NativeSource(tmp_path / "nat")
    k = src.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert len(k["pieces"]) == 1
    q = src.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert [p["start"] for p in q["pieces"]] == [0, 16, 32, 48]


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    hf = save_hf_model("llama", tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    main(["convert", "hf-to-native", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nat"), "--tp", "2"])
    main(["convert", "native-to-hf", "--ckpt", str(tmp_path / "nat"), "--out", str(tmp_path / "back")])
    a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert all(b[n].dtype == torch.bfloat16 and torch.equal(a[n], b[n]) for n in a)


def _break(hf_dir, how):
    path = hf_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.1.mlp.up_proj.weight"
    if how == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("case,expect", [
    ("missing", "lacks tensor model.layers.1.mlp.up_proj.weight"),
    ("misshaped", "has shape"),
    ("arch", "unsupported architecture"),
    ("tp", "does not divide num_heads"),
    ("pickle", "pickle"),
    ("notdir", "no config.json"),
])
def test_bad_input_one_line_error_no_output(tmp_path, capsys, case, expect):
    hf_dir = tmp_path / "hf"
    save_hf_model("llama", hf_dir)
    tp = "2"
    if case in ("missing", "misshaped"):
        _break(hf_dir, case)
    elif case == "arch":
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (hf_dir / "config.json").write_text(json.dumps(cfg))
    elif case == "tp":
        tp = "3"
    elif case == "pickle":
        (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    elif case == "notdir":
        hf_dir = tmp_path / "nowhere"
    capsys.readouterr()
    code = main(["convert", "hf-to-native", "--hf", str(hf_dir), "--out", str(tmp_path / "out"), "--tp", tp])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expect in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_truncated_native_checkpoint_is_rejected(tmp_path, capsys):
    save_hf_model("llama", tmp_path / "hf")
    main(["convert", "hf-to-native", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nat"), "--tp", "2"])
    shard = tmp_path / "nat" / "tp01-pp00.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert main(["convert", "native-to-hf", "--ckpt", str(tmp_path / "nat"), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "nat" / INDEX).unlink()
    assert main(["convert", "native-to-hf", "--ckpt", str(tmp_path / "nat"), "--out", str(tmp_path / "o")]) != 0
    assert "not a complete trident checkpoint" in capsys.readouterr().err


def test_check_hf_at_tp2(tmp_path, capsys):
    save_hf_model("qwen2", tmp_path / "hf")
    assert main(["check-hf", "--hf", str(tmp_path / "hf"), "--tp", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["max_abs_diff"] <= 1e-4
