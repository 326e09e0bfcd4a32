"""A native checkpoint written out as an HF directory (safetensors shards + config.json + tokenizer),
loadable by `transformers` and vLLM: `trident convert native-to-hf`, and the recipes' `export_hf`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine.errors import ConfigError
from engine.layout import canonical_names

HF_SHARD_BYTES = 2 * 1024**3


def _fresh_output(out: str, force: bool) -> Path:
    path = Path(out)
    if path.exists() and any(path.iterdir()) and not force:
        raise ConfigError(f"output {path} exists and is not empty (pass --force to replace it)")
    staging = ckpt.staging_dir(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def native_to_hf(ckpt_dir: str, out: str, force: bool = False, max_shard_bytes: int = HF_SHARD_BYTES) -> None:
    source = ckpt.NativeSource(ckpt_dir)
    cfg = source.config
    names = canonical_names(cfg)
    for name in names:
        source.shape(name)  # fail before writing anything if a tensor is missing
    sizes = {n: _nbytes(source.tensors[n]) for n in names}
    files = _plan_shards(names, sizes, max_shard_bytes)
    staging = _fresh_output(out, force)
    try:
        weight_map = {}
        for i, group in enumerate(files):
            fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            tensors = {n: source.read(n, None, 0, 0).contiguous() for n in group}
            save_file(tensors, str(staging / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in group})
            del tensors
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_cfg = cfg.to_hf()
        hf_cfg["torch_dtype"] = source.tensors[names[0]]["dtype"]
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        ckpt.copy_tokenizer_files(Path(ckpt_dir), staging)
        ckpt.publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _nbytes(meta: dict) -> int:
    n = 1
    for d in meta["shape"]:
        n *= d
    return n * getattr(torch, meta["dtype"]).itemsize


def _plan_shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    files, current, used = [], [], 0
    for n in names:
        if current and used + sizes[n] > limit:
            files.append(current)
            current, used = [], 0
        current.append(n)
        used += sizes[n]
    return files + [current] if current else files
