"""Training-state checkpoints: everything a bit-exact resume needs, indexed by global tensor so any
TP x PP x DP layout (with or without ZeRO-1) loads it, and written so a crash never leaves a
half-written checkpoint looking complete.

  out_dir/checkpoints/
    step-00000040/
      model/                      native weights (trident_index.json + tpXX-ppYY shards): --init takes it
      model.optim/exp_avg/        fp32 Adam moments and (for low-precision parameters) fp32 masters,
      model.optim/exp_avg_sq/     each a native checkpoint of the same global tensors, so they reshard
      model.optim/master/         exactly like the weights
      model.fp8/pp00.safetensors  FP8 scaling state per pipeline rank (restored when the layout matches)
      rng/rank-00000.json         python / numpy / torch / CUDA generator states of every rank
      trainer_state.json          written last: steps, loss scaler, data position, recipe state, layout
    latest                        the name of the newest complete checkpoint, replaced last

A save writes into `.step-N.partial`, which rank 0 renames into place once every rank's files and
trainer_state.json are there; `latest` is replaced (atomically) after the rename and old
checkpoints are pruned after that. Killed at any point, the previous checkpoint stays loadable.
PPO saves several models (actor, critic) into one checkpoint, each under its own name.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine.errors import CheckpointError
from engine.faults import crash_point
from parallel import comm
from parallel.config import NonNegInt, PositiveInt

FORMAT, VERSION = "trident-train-state", 1
STATE_FILE, LATEST = "trainer_state.json", "latest"
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "master")


@dataclass
class CheckpointConfig:
    save_every: NonNegInt = 0
    """Save the full training state every N optimizer steps (0: never; see `at_end`). Opt-in, as in
    torchtitan: a run directory that holds checkpoints resumes from them when started again."""
    at_end: bool = False
    """Also save the training state after the last step (to extend the run later)."""
    keep_last: PositiveInt = 2
    """Keep this many training-state checkpoints; older ones are deleted after a save completes."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- saving -------------------------------------------------------------------------------------

def save(root: str | os.PathLike, step: int, handles: dict, state, trainer: dict, keep_last: int,
         tokenizer_path: str | None = None) -> Path:
    """Save every handle's full training state and the recipe's `trainer` dict (JSON) as checkpoint
    `step` under root (collective: every rank calls it). Returns the published directory."""
    root = Path(root)
    final, staging = root / step_name(step), root / f".{step_name(step)}.partial"
    if state.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "rng").mkdir(parents=True)
    comm.barrier()
    for i, (name, h) in enumerate(handles.items()):
        h.params_ready()
        if state.rank == 0:
            (staging / name).mkdir()
        comm.barrier()
        ckpt.write_native(h.chunks, state, staging / name, tokenizer_path=tokenizer_path if i == 0 else None)
        crash_point(f"save:mid_shard:{step}")  # weights written, optimizer state not yet
        if h.optimizer is not None:
            opt = h.optimizer_state()  # collective over DP under ZeRO-1
            low_precision = h.dtype != torch.float32  # fp32 parameters are their own masters
            for key in OPTIM_KEYS if low_precision else OPTIM_KEYS[:2]:
                sub = staging / f"{name}.optim" / key
                if state.rank == 0:
                    sub.mkdir(parents=True)
                comm.barrier()
                ckpt.write_native(h.chunks, state, sub, tensors=opt[key], dtype=torch.float32)
        if h.fp8 is not None and state.tp_rank == 0 and state.dp_rank == 0:
            fp8 = h.fp8.state_dict()
            (staging / f"{name}.fp8").mkdir(exist_ok=True)
            save_file({"scale": fp8["scale"].cpu(), "history": fp8["history"].cpu()},
                      str(staging / f"{name}.fp8" / f"pp{state.pp_rank:02d}.safetensors"),
                      metadata={"names": json.dumps(fp8["names"]), "started": str(fp8["started"])})
    (staging / "rng" / f"rank-{state.rank:05d}.json").write_text(json.dumps(rng_state()))
    comm.barrier()
    if state.rank == 0:
        models = {name: _model_state(h) for name, h in handles.items()}
        doc = {"format": FORMAT, "version": VERSION, "step": step, "models": models, "trainer": trainer,
               "layout": _layout(state, handles)}
        (staging / STATE_FILE).write_text(json.dumps(doc, indent=1))
        crash_point(f"save:before_rename:{step}")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        crash_point(f"save:before_latest:{step}")
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
        _prune(root, keep_last)
    comm.barrier()
    return final


def _model_state(h) -> dict:
    out = {"steps": h.steps, "skipped_steps": h.skipped_steps, "dtype": str(h.dtype).removeprefix("torch."),
           "distributed_optimizer": bool(h.optim_cfg and h.optim_cfg.distributed)}
    if h.optimizer is not None:
        out["optimizer_step"] = float(h.optimizer.step_t.item())
    if h.precision.scaler is not None:
        out["loss_scaler"] = h.precision.scaler.state_dict()
    return out


def _layout(state, handles) -> dict:
    first = next(iter(handles.values()))
    return {"tp": state.tp, "pp": state.pp, "dp": state.dp, "world": state.world_size,
            "virtual_stages": len(first.chunks)}


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---- finding and loading --------------------------------------------------------------------------

def find(path: str | os.PathLike) -> Path | None:
    """The checkpoint a path names: a step directory, a checkpoints root or a run directory (through
    its `latest` pointer), or a weights-only native checkpoint; None when a run dir has none yet."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or (p / ckpt.INDEX).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            target = root / (root / LATEST).read_text().strip()
            if not (target / STATE_FILE).is_file():
                raise CheckpointError(f"{root / LATEST} points to {target.name}, which is not a complete checkpoint")
            return target
    return None


def resolve_resume(resume: str | None, out_dir: str) -> tuple[Path | None, str]:
    """(checkpoint to resume from, why) before anything is built: `--resume` names one (an error if
    it holds none), else a run directory that already holds checkpoints resumes by itself."""
    if resume:
        if not Path(resume).exists():
            raise CheckpointError(f"--resume {resume}: no such directory")
        found = find(resume)
        if found is None:
            raise CheckpointError(f"--resume {resume}: no checkpoint there (no {STATE_FILE}, {ckpt.INDEX} or {LATEST})")
        if (found / STATE_FILE).is_file():
            read_state(found)
        return found, f"--resume {resume}"
    found = find(Path(out_dir) / "checkpoints") if (Path(out_dir) / "checkpoints").is_dir() else None
    return found, f"found in the run directory {out_dir}"


def read_state(path: Path) -> dict:
    doc = ckpt._read_json(path / STATE_FILE, f"{path} has no {STATE_FILE}")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{path / STATE_FILE} is not a {FORMAT} v{VERSION} file")
    return doc


def load(path: Path, handles: dict, state, log=print) -> dict | None:
    """Load a checkpoint into the handles (any layout); returns the recipe's trainer dict, or None
    for a weights-only checkpoint (weights loaded, optimizer state fresh: the caller starts at step 0)."""
    if not (path / STATE_FILE).is_file():
        _check_config(path, next(iter(handles.values())))
        for h in handles.values():
            for c in h.chunks:
                ckpt.load_into(c, ckpt.NativeSource(path))
        log(f"{path} is a weights-only checkpoint: weights loaded, optimizer state starts fresh at step 0")
        return None
    doc = read_state(path)
    for name, h in handles.items():
        if name not in doc["models"]:
            raise CheckpointError(f"{path / STATE_FILE} holds no model {name!r} (has {sorted(doc['models'])})")
        _load_model(path, name, h, doc["models"][name], doc["layout"], state, log)
    same = doc["layout"] == _layout(state, handles)
    if same:
        set_rng_state(json.loads(_read(path / "rng" / f"rank-{state.rank:05d}.json")))
    else:
        log(f"layout changed ({_fmt(doc['layout'])} -> {_fmt(_layout(state, handles))}): weights and optimizer "
            f"state resharded by global tensor; per-rank RNG states not restored")
    return doc["trainer"]


def _fmt(layout: dict) -> str:
    return f"TP{layout['tp']} x PP{layout['pp']} x DP{layout['dp']}"


def _read(path: Path) -> str:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    return path.read_text()


def _check_config(path: Path, h) -> None:
    src = ckpt.NativeSource(path)
    mine = vars(h.chunks[0].cfg)
    diff = [k for k in mine if k in src.index["model"] and src.index["model"][k] != mine[k]]
    if diff:
        raise CheckpointError(f"{path / ckpt.INDEX} is for another model ({diff[0]}: {src.index['model'][diff[0]]} "
                              f"vs {mine[diff[0]]})")


@torch.no_grad()
def _load_model(path: Path, name: str, h, meta: dict, layout: dict, state, log) -> None:
    weights = path / name
    _check_config(weights, h)
    for c in h.chunks:
        ckpt.load_into(c, ckpt.NativeSource(weights))
    sd = {"model": {}, "steps": meta["steps"], "skipped_steps": meta["skipped_steps"]}
    if h.optimizer is not None:
        if "optimizer_step" not in meta:
            raise CheckpointError(f"{path / STATE_FILE}: model {name!r} was saved without optimizer state")
        params = dict(h.named)
        opt = {"step": torch.tensor(meta["optimizer_step"], device=h.device)}
        for key in OPTIM_KEYS:
            sub = path / f"{name}.optim" / key
            if key == "master" and not sub.exists():  # fp32 parameters were their own masters
                opt[key] = {n: p.detach().float() for n, p in params.items()}
                continue
            targets = {n: torch.empty(p.shape, dtype=torch.float32, device=h.device) for n, p in params.items()}
            src = ckpt.NativeSource(sub)
            for c in h.chunks:
                ckpt.load_into(c, src, targets)
            opt[key] = targets
        sd["optimizer"] = opt
    if h.precision.scaler is not None and "loss_scaler" in meta:
        sd["loss_scaler"] = meta["loss_scaler"]
    h.load_state_dict(sd)
    if h.fp8 is not None:
        f = path / f"{name}.fp8" / f"pp{state.pp_rank:02d}.safetensors"
        if layout["pp"] == state.pp and layout["virtual_stages"] == len(h.chunks) and f.is_file():
            with safe_open(str(f), framework="pt") as st:
                meta8 = st.metadata()
                h.fp8.load_state_dict({"names": json.loads(meta8["names"]), "started": meta8["started"] == "True",
                                       "scale": st.get_tensor("scale"), "history": st.get_tensor("history")})
        else:
            log(f"{name}: FP8 scaling state starts fresh (the pipeline split changed)")


# ---- RNG ----------------------------------------------------------------------------------------

def b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    import numpy as np

    version, inner, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(inner), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
           "torch": b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    import numpy as np

    version, inner, gauss = s["python"]
    random.setstate((version, tuple(inner), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(unb64(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(x) for x in s["cuda"]])
