"""`trident convert hf-to-native|native-to-hf` and `trident check-hf`.

Conversion streams: hf-to-native holds one rank's shard at a time, native-to-hf one output file.
Output appears under its final name only when complete.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine.errors import CheckpointError, ConfigError
from engine.hf_export import HF_SHARD_BYTES, _fresh_output, native_to_hf  # noqa: F401 (public here too)
from engine.layout import shard_layout
from parallel.pipeline import partition_layers

def hf_to_native(hf_dir: str, out: str, tp: int = 1, pp: int = 1, force: bool = False) -> None:
    source = ckpt.HFSource(hf_dir)
    cfg = source.config
    cfg.validate_tp(tp)
    stages = partition_layers(cfg.num_layers, pp)
    staging = _fresh_output(out, force)
    try:
        dtypes: dict[str, str] = {}
        for pp_rank, layers in enumerate(stages):
            for tp_rank in range(tp):
                tensors = {}
                for s in shard_layout(cfg, tp, tp_rank, layers, pp_rank == 0, pp_rank == pp - 1):
                    if not s.owner or s.length == 0:
                        continue
                    shape = source.shape(s.name)
                    if shape != s.shape:
                        raise CheckpointError(f"tensor {s.name} has shape {list(shape)}, expected {list(s.shape)}")
                    tensors[s.name] = source.read(s.name, s.dim, s.start, s.length).contiguous()
                    dtypes[s.name] = ckpt.dtype_name(tensors[s.name].dtype)
                save_file(tensors, str(staging / ckpt.shard_file(tp_rank, pp_rank)))
                del tensors
        ckpt.copy_tokenizer_files(Path(hf_dir), staging)
        ckpt.write_index(staging, cfg, tp, stages, dtypes.__getitem__)
        ckpt.publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---- check-hf ----------------------------------------------------------------------------------------

def _engine_logits(rank, world, hf_dir, ids, tp):
    from engine.model import Transformer
    from parallel import comm
    from parallel.state import build_state

    state = build_state(rank, tp, 1, world // tp, torch.device("cpu"))
    source = ckpt.HFSource(hf_dir)
    model = Transformer(source.config, state).eval()
    ckpt.load_into(model, source)
    with torch.no_grad():
        local = model(ids)
    per_rank = -(-source.config.vocab_size // tp)
    local = torch.nn.functional.pad(local, (0, per_rank - local.shape[-1]))
    return comm.all_gather(local, state.tp_group, -1)[..., : source.config.vocab_size]


def check_hf(hf_dir: str, tp: int = 1, pp: int = 1, tol: float = 1e-4, seq: int = 32, seed: int = 0) -> float:
    """Max |engine - transformers| logit difference on random tokens; raises above tol."""
    import transformers

    from parallel.launch import run_ranks

    if pp != 1:
        raise ConfigError("check-hf supports pp=1 only until pipeline schedules land")
    source = ckpt.HFSource(hf_dir)
    source.config.validate_tp(tp)
    ids = torch.randint(0, source.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    del hf
    if tp == 1:
        got = _engine_logits(0, 1, hf_dir, ids, 1)
    else:
        got = run_ranks(tp, _engine_logits, hf_dir, ids, tp)[0]
    diff = (got - ref).abs().max().item()
    print(json.dumps({"max_abs_diff": diff, "tol": tol, "tp": tp, "pp": pp}))
    if not diff <= tol:
        raise CheckpointError(f"engine and transformers logits differ by {diff:.3g} (> {tol})")
    return diff


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trident convert", description="Convert between HF and native checkpoints.")
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-native", help="HF safetensors directory -> native sharded checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the shards")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the shards")
    a.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    b = sub.add_parser("native-to-hf", help="native checkpoint (any layout) -> HF directory")
    b.add_argument("--ckpt", required=True, help="native checkpoint directory")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    if args.direction == "hf-to-native":
        hf_to_native(args.hf, args.out, args.tp, args.pp, args.force)
    else:
        native_to_hf(args.ckpt, args.out, args.force)
    print(f"wrote {args.out}")
    return 0


def check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trident check-hf",
                                     description="Compare engine and transformers logits on an HF model.")
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed abs logit difference")
    args = parser.parse_args(argv)
    check_hf(args.hf, args.tp, args.pp, args.tol)
    return 0
