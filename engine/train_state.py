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
      trainer_tensors.safetensors the recipe's tensors, if any (PPO: the batch in flight under async rollouts)
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
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.errors import CheckpointError
from engine.faults import crash_point
from parallel import comm
from parallel.config import NonNegInt, PositiveInt

FORMAT, VERSION = "trident-train-state", 1
STATE_FILE, LATEST, TENSORS_FILE = "trainer_state.json", "latest", "trainer_tensors.safetensors"
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
    async_save: bool = False
    """Write checkpoint files in a background thread while training goes on (training is blocked
    only while the state is copied to host memory); it is published at the next save or the end."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- saving -------------------------------------------------------------------------------------

class PendingSave:
    """A checkpoint being written: this rank's files (CPU copies, taken when the save started), then
    `finalize()` (collective) publishes it. With async_save the files are written by a background
    thread while training goes on, and the next save or the end of the run finalizes."""

    def __init__(self, root: Path, step: int, state, files: list, texts: list, indexes: list, doc: dict,
                 keep_last: int):
        self.root, self.step, self.state, self.keep_last = root, step, state, keep_last
        self.final = root / step_name(step)
        self.staging = ckpt.staging_dir(self.final)
        self.files, self.texts, self.indexes, self.doc = files, texts, indexes, doc
        self.thread, self.error = None, None

    def write(self) -> None:
        """This rank's files into the staging directory (no collectives: safe in a thread)."""
        try:
            for i, (path, tensors, meta) in enumerate(self.files):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(path), metadata=meta)
                if i == len(self.files) // 2:
                    crash_point(f"save:mid_shard:{self.step}")
            for path, text in self.texts:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        except BaseException as e:  # re-raised by finalize on the training thread
            self.error = e

    def start(self) -> None:
        import threading
        self.thread = threading.Thread(target=self.write, name=f"save-{self.step}", daemon=True)
        self.thread.start()

    def finalize(self) -> Path:
        """Wait for every rank's files, then rank 0 writes the indexes and trainer_state.json, renames
        the staging directory into place, replaces `latest` and prunes (collective)."""
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise CheckpointError(f"writing checkpoint {self.final} failed: {self.error}") from self.error
        comm.barrier()
        if self.state.rank == 0:
            for out, chunks_cfg, tp, stages, dtype, tokenizer in self.indexes:
                ckpt.write_index(out, chunks_cfg, tp, stages, lambda _, d=dtype: d)
                ckpt.copy_tokenizer(tokenizer, out)
            (self.staging / STATE_FILE).write_text(json.dumps(self.doc, indent=1))
            crash_point(f"save:before_rename:{self.step}")
            ckpt.publish(self.staging, self.final)
            crash_point(f"save:before_latest:{self.step}")
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(self.final.name)
            os.replace(tmp, self.root / LATEST)
            _prune(self.root, self.keep_last)
        comm.barrier()
        return self.final


def save(root: str | os.PathLike, step: int, handles: dict, state, trainer: dict, keep_last: int,
         tokenizer_path: str | None = None, async_save: bool = False, tensors: dict | None = None) -> PendingSave:
    """Save every handle's full training state, the recipe's `trainer` dict (JSON) and its `tensors`
    (the same on every rank; rank 0 writes them) as checkpoint `step` under root (collective: every
    rank calls it). The state is copied to host memory first; synchronous saves are finalized before
    this returns, async ones by the caller (`finalize()`)."""
    root = Path(root)
    staging = ckpt.staging_dir(root / step_name(step))
    if state.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    comm.barrier()
    files, indexes = [], []
    for i, (name, h) in enumerate(handles.items()):
        h.params_ready()
        stages, cfg = ckpt.stage_ranges(h.chunks, state), h.chunks[0].cfg
        files += [(p, t, None) for p, t in ckpt.native_files(h.chunks, state, staging / name)]
        indexes.append((staging / name, cfg, state.tp, stages, ckpt.dtype_name(h.dtype),
                        tokenizer_path if i == 0 else None))
        if h.optimizer is not None:
            opt = h.optimizer_state()  # collective over DP under ZeRO-1
            for key in OPTIM_KEYS if h.dtype != torch.float32 else OPTIM_KEYS[:2]:  # fp32: params are masters
                sub = staging / f"{name}.optim" / key
                files += [(p, t, None) for p, t in ckpt.native_files(h.chunks, state, sub, opt[key])]
                indexes.append((sub, cfg, state.tp, stages, "float32", None))
        if h.fp8 is not None and state.tp_rank == 0 and state.dp_rank == 0:
            fp8 = h.fp8.state_dict()
            files.append((staging / f"{name}.fp8" / f"pp{state.pp_rank:02d}.safetensors",
                          {"scale": fp8["scale"].cpu(), "history": fp8["history"].cpu()},
                          {"names": json.dumps(fp8["names"]), "started": str(fp8["started"])}))
    if tensors and state.rank == 0:
        files.append((staging / TENSORS_FILE, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, None))
    texts = [(staging / "rng" / f"rank-{state.rank:05d}.json", json.dumps(rng_state()))]
    doc = {"format": FORMAT, "version": VERSION, "step": step,
           "models": {name: _model_state(h) for name, h in handles.items()}, "trainer": trainer,
           "layout": _layout(state, handles)}
    pending = PendingSave(root, step, state, files, texts, indexes, doc, keep_last)
    if async_save:
        pending.start()
    else:
        pending.write()
        pending.finalize()
    return pending


class Saver:
    """A recipe's checkpointing: when to save (checkpoint.save_every, at_end), at most one async save
    in flight, finalized before the next and by `close()`."""

    def __init__(self, cfg: CheckpointConfig, root: str | os.PathLike, total_steps: int, state,
                 tokenizer_path: str | None = None):
        self.cfg, self.root, self.total, self.state, self.tokenizer = cfg, Path(root), total_steps, state, tokenizer_path
        self.pending = None

    def due(self, step: int) -> bool:
        return bool(self.cfg.save_every and step % self.cfg.save_every == 0) or (step == self.total and self.cfg.at_end)

    def step_end(self, step: int, handles: dict, trainer, tensors=None) -> None:
        """After optimizer step `step`: save if due (`trainer`: the recipe state, or a function
        returning it; `tensors` likewise); then the fault tests' kill point."""
        if self.due(step):
            self.close()
            self.pending = save(self.root, step, handles, self.state, trainer() if callable(trainer) else trainer,
                                self.cfg.keep_last, self.tokenizer, self.cfg.async_save,
                                tensors() if callable(tensors) else tensors)
        crash_point(f"after_step:{step}")

    def close(self) -> None:
        if self.pending is not None and self.pending.thread is not None:
            self.pending.finalize()
        self.pending = None


def _model_state(h) -> dict:
    out = {"steps": h.steps, "skipped_steps": h.skipped_steps, "dtype": ckpt.dtype_name(h.dtype),
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


def resume(found: tuple, handles: dict, state) -> tuple[int, dict | None]:
    """Load what `resolve_resume` found into the handles: (steps already done, the recipe's saved
    state), or (0, None) for a fresh start or a weights-only checkpoint. Rank 0 logs which."""
    path, why = found
    if path is None:
        return 0, None
    say = tqdm.write if state.rank == 0 else (lambda msg: None)
    say(f"resuming from {path} ({why})")
    saved = load(path, handles, state, say)
    return (saved["step"], saved) if saved else (0, None)


def read_tensors(path: Path | None) -> dict[str, torch.Tensor]:
    """The recipe's tensors saved with checkpoint `path` (empty if it has none)."""
    if path is None or not (path / TENSORS_FILE).is_file():
        return {}
    try:
        with safe_open(str(path / TENSORS_FILE), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{path / TENSORS_FILE} is not readable: {e}") from e


def read_state(path: Path) -> dict:
    doc = ckpt._read_json(path / STATE_FILE, f"{path} has no {STATE_FILE}")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"{path / STATE_FILE} is not a {FORMAT} v{VERSION} file")
    return doc


def load(path: Path, handles: dict, state, log=print) -> dict | None:
    """Load a checkpoint into the handles (any layout); returns the recipe's trainer dict, or None
    for a weights-only checkpoint (weights loaded, optimizer state fresh: the caller starts at step 0)."""
    if not (path / STATE_FILE).is_file():
        if len(handles) > 1:
            raise CheckpointError(f"{path} holds weights only, not the training state of {' and '.join(handles)}; "
                                  f"start a new run from it instead (e.g. --actor {path})")
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
