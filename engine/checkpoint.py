"""Weights in and out: HF safetensors and trident's native sharded format, streamed tensor by tensor.

Native format (a directory):
  trident_index.json   {"format": "trident-native", "version": 1, "model": ModelConfig, "layout": {...},
                        "tensors": {canonical name: {"shape", "dtype", "split_dim",
                                                      "pieces": [{"file", "start", "length"}]}}}
  tp00-pp00.safetensors ...  one file per (tp, pp) position, keys are canonical (HF) names
The index describes the global tensors, not the layout that wrote them, so any layout can read any
checkpoint by slicing (safetensors reads slices lazily, never the whole file). The index is written
last and the directory renamed into place, so a directory with an index is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.layout import ShardSpec, shard_layout

INDEX = "trident_index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_json(path: Path, missing: str) -> dict:
    """A JSON file, or a one-line CheckpointError (`missing` when absent)."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class _SafetensorsFiles:
    """Lazy handles on a set of safetensors files."""

    def __init__(self, root: Path):
        self.root, self._open = root, {}

    def handle(self, file: str):
        if file not in self._open:
            path = self.root / file
            try:
                self._open[file] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated/foreign files
                raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        return self._open[file]


def _narrow(sl, shape, dim, start, length) -> torch.Tensor:
    """Read [start, start+length) along dim from a lazy safetensors slice."""
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + length)
    return sl[tuple(index)]


class HFSource(_SafetensorsFiles):
    """An HF model directory: config.json + model.safetensors or a sharded index."""

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        super().__init__(root)
        self.hf_config = _read_json(root / "config.json", f"{root} has no config.json (not an HF model directory)")
        self.config = ModelConfig.from_hf(self.hf_config)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (root / "model.safetensors").is_file():
            self.where = {k: "model.safetensors" for k in self.handle("model.safetensors").keys()}
        elif list(root.glob("*.bin")) or list(root.glob("*.pt")):
            raise CheckpointError(f"{root} holds pickle weights (.bin/.pt); only safetensors are loaded")
        else:
            raise CheckpointError(f"{root} has no model.safetensors or model.safetensors.index.json")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self.where:
            raise CheckpointError(f"checkpoint {self.root} lacks tensor {name}")
        return self.handle(self.where[name]).get_slice(name)

    def read(self, name: str, dim: int | None, start: int, length: int, shape=None) -> torch.Tensor:
        sl = self._slice(name)
        shape = sl.get_shape()
        return sl[:] if dim is None else _narrow(sl, shape, dim, start, length)


class NativeSource(_SafetensorsFiles):
    """A trident native checkpoint saved at any layout."""

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        super().__init__(root)
        index = root / INDEX
        self.index = _read_json(index, f"{root} is not a complete trident checkpoint (no {INDEX})")
        if self.index.get("format") != "trident-native":
            raise CheckpointError(f"{index} is not a trident-native index")
        self.config = ModelConfig(**self.index["model"])
        self.tensors = self.index["tensors"]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint {self.root} lacks tensor {name}")
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, dim: int | None, start: int, length: int, shape=None) -> torch.Tensor:
        meta = self.tensors.get(name)
        if meta is None:
            raise CheckpointError(f"checkpoint {self.root} lacks tensor {name}")
        split = meta["split_dim"]
        if split is None:
            full = self.handle(meta["pieces"][0]["file"]).get_tensor(name)
            return full if dim is None else full.narrow(dim, start, length)
        if dim != split:  # a different split than stored: assemble, then cut
            full = torch.cat([self.handle(p["file"]).get_tensor(name) for p in meta["pieces"]], dim=split)
            return full if dim is None else full.narrow(dim, start, length)
        parts, end = [], start + length
        for p in meta["pieces"]:
            a, b = max(start, p["start"]), min(end, p["start"] + p["length"])
            if a < b:
                sl = self.handle(p["file"]).get_slice(name)
                parts.append(_narrow(sl, sl.get_shape(), dim, a - p["start"], b - a))
        got = sum(t.shape[dim] for t in parts)
        if got != length:
            raise CheckpointError(f"checkpoint {self.root} covers {got} of {length} rows of {name}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def open_source(path: str | os.PathLike):
    """A native checkpoint or an HF directory, told apart by their index files."""
    return NativeSource(path) if (Path(path) / INDEX).is_file() else HFSource(path)


class RandomSource:
    """Deterministic random init, one generator per tensor name, so every layout draws equal weights."""

    def __init__(self, config: ModelConfig, seed: int, std: float = 0.02):
        self.config, self.seed, self.std = config, seed, std

    def shape(self, name: str) -> None:
        return None  # any shape: the layout asks for what it needs

    def read(self, name: str, dim: int | None, start: int, length: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        if name.endswith("norm.weight"):
            full = torch.ones(shape)
        elif name.endswith(".bias"):
            full = torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=g) * self.std
        return full if dim is None else full.narrow(dim, start, length)


def _check_shape(source, spec: ShardSpec) -> None:
    got = source.shape(spec.name)
    if got is not None and got != spec.shape:
        raise CheckpointError(f"tensor {spec.name} has shape {list(got)}, expected {list(spec.shape)}")


def load_into(model: torch.nn.Module, source, targets: dict | None = None) -> None:
    """Fill this rank's parameters from a source (HF, native, random), checking every shape; or, given
    `targets` (parameter name -> tensor shaped like it, e.g. fp32 optimizer state), fill those."""
    params = targets if targets is not None else dict(model.named_parameters())
    with torch.no_grad():
        for spec in model.shard_specs():
            _check_shape(source, spec)
            piece = source.read(spec.name, spec.dim, spec.start, spec.length, spec.shape)
            target = params[spec.param]
            if spec.rows is not None:
                target = target[spec.rows[0]:spec.rows[1]]
            target.copy_(piece.reshape(target.shape))


def _piece_index(config: ModelConfig, tp: int, stages: list[range], dtype_of) -> dict:
    tensors: dict = {}
    for pp_rank, layers in enumerate(stages):
        for tp_rank in range(tp):
            for s in shard_layout(config, tp, tp_rank, layers, pp_rank == 0, pp_rank == len(stages) - 1):
                if not s.owner or s.length == 0:
                    continue
                meta = tensors.setdefault(s.name, {"shape": list(s.shape), "dtype": dtype_of(s.name),
                                                   "split_dim": s.dim, "pieces": []})
                meta["pieces"].append({"file": shard_file(tp_rank, pp_rank), "start": s.start, "length": s.length})
    return tensors


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def write_index(out: Path, config: ModelConfig, tp: int, stages: list[range], dtype_of, extra: dict | None = None):
    index = {"format": "trident-native", "version": 1, "model": vars(config).copy(),
             "layout": {"tp": tp, "pp": len(stages), "stages": [[r.start, r.stop] for r in stages]},
             "tensors": _piece_index(config, tp, stages, dtype_of)}
    index.update(extra or {})
    (out / INDEX).write_text(json.dumps(index, indent=1))


def staging_dir(out: str | os.PathLike) -> Path:
    """Where a checkpoint is written before it is renamed into place."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def publish(staging: Path, out: str | os.PathLike) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def shard_tensors(model: torch.nn.Module, tensors: dict | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the canonical pieces this rank owns: of its parameters, or of `tensors`
    (parameter name -> tensor shaped like it, e.g. fp32 optimizer state)."""
    params = tensors if tensors is not None else dict(model.named_parameters())
    out = {}
    for spec in model.shard_specs():
        if not spec.owner or spec.length == 0:
            continue
        t = params[spec.param].detach()
        if spec.rows is not None:
            t = t[spec.rows[0]:spec.rows[1]]
        out[spec.name] = t.to("cpu", copy=True).contiguous()
    return out


def stage_ranges(chunks: list, state) -> list[range]:
    """Every virtual stage's layer range, in stage order (chunk c of pipeline rank r is stage
    c * pp + r); collective over the pipeline group."""
    from parallel import comm

    per_rank = comm.all_gather_object([(c.layer_ids.start, c.layer_ids.stop) for c in chunks], state.pp_group)
    return [range(*per_rank[r][c]) for c in range(len(chunks)) for r in range(state.pp)]


def native_files(chunks: list, state, out: Path, tensors: dict | None = None) -> list[tuple[Path, dict]]:
    """(file, tensors) this rank writes for a native checkpoint in `out` (none off DP rank 0)."""
    if state.dp_rank != 0:
        return []
    return [(out / shard_file(state.tp_rank, c * state.pp + state.pp_rank), shard_tensors(chunk, tensors))
            for c, chunk in enumerate(chunks)]


def write_native(chunks: list, state, out: Path, tensors: dict | None = None, dtype: torch.dtype | None = None,
                 tokenizer_path: str | None = None) -> None:
    """Write a native checkpoint into an existing directory (collective, no staging): DP rank 0 of each
    (tp, pp) position its shard, rank 0 the index last. `tensors` (parameter name -> tensor) replaces
    the weights, e.g. by fp32 optimizer state indexed like them."""
    from parallel import comm

    for path, pieces in native_files(chunks, state, out, tensors):
        save_file(pieces, str(path))
    stages = stage_ranges(chunks, state)
    comm.barrier()
    if state.rank == 0:
        name = dtype_name(dtype or chunks[0].dtype)
        write_index(out, chunks[0].cfg, state.tp, stages, lambda _: name)
        copy_tokenizer(tokenizer_path, out)


def copy_tokenizer(tokenizer_path: str | None, out: Path) -> None:
    """The run's tokenizer file (sentencepiece .model or tokenizer.json) beside a checkpoint."""
    tok = Path(tokenizer_path) if tokenizer_path else None
    if tok and tok.is_file():
        shutil.copyfile(tok, out / ("tokenizer.model" if tok.suffix == ".model" else "tokenizer.json"))


def save_native(chunks: list, state, out: Path, tokenizer_path: str | None = None) -> None:
    """A native checkpoint from every rank's chunks (collective), written into a staging directory
    that rank 0 renames into place once the index (written last) is there."""
    from parallel import comm

    staging = staging_dir(out)
    if state.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    comm.barrier()
    write_native(chunks, state, staging, tokenizer_path=tokenizer_path)
    if state.rank == 0:
        publish(staging, out)
    comm.barrier()
