"""`trident rm`: reward-model training with the Bradley-Terry pairwise loss, at any TP x PP x DP.

Data: JSONL with `prompt`, `chosen`, `rejected`. The model is a scalar-head decoder; a sequence's
score is the head's value at its last token (the EOS after the response). Loss: -log sigmoid(s_c - s_r),
averaged over the step's pairs on every DP rank (each rank takes its contiguous share of them).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.build import build_handle, check_parallel, check_precision, with_value_head
from engine.config import ParallelConfig, PrecisionSettings, parse_run_args, validate
from engine.data import read_jsonl
from engine.errors import ConfigError, DataError
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from engine.train_state import CheckpointConfig, Saver, b64, resolve_resume, resume, unb64
from parallel import comm
from parallel.config import PositiveInt
from parallel.optimizer import OptimConfig
from parallel.state import init_parallel

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PairSettings(PrecisionSettings):
    """What the preference recipes (rm, dpo) share: the pairs, the layout, the step loop, checkpoints."""
    tokenizer: str = "data/tokenizer.model"
    """A sentencepiece .model, an HF tokenizer.json, or a directory holding one."""
    train: str = "data/prefs_train.jsonl"
    """Preference pairs: JSONL with prompt, chosen, rejected."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / DP layout (pairs are split over DP ranks)."""
    steps: PositiveInt = 200
    """Optimizer steps."""
    batch_pairs: PositiveInt = 32
    """Preference pairs per optimizer step, over all DP ranks."""
    micro_batch_pairs: PositiveInt | None = None
    """Pairs per forward/backward on one rank (None: the rank's whole share of the step)."""
    max_len: PositiveInt = 64
    """Longest prompt + response; longer pairs are skipped (and counted)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training-state checkpoints (out_dir/checkpoints/step-N)."""
    resume: str | None = None
    """Resume from a training-state checkpoint, a checkpoints directory or a run directory (see train)."""


@dataclass
class RMConfig(PairSettings):
    init: str = "runs/demo_sft/checkpoint"
    """Checkpoint to start from (a policy: its LM head is replaced by a small random scalar head)."""
    eval: str | None = "data/prefs_eval.jsonl"
    """Held-out pairs for the pairwise accuracy (None: no evaluation)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=5e-5, warmup_steps=10,
                                                                      weight_decay=0.0))
    """AdamW and its schedule."""
    eval_every: PositiveInt = 50
    """Evaluate every N steps (and after the last)."""
    seed: int = 0
    """Seeds the head's init and the pair order."""
    out_dir: str = "runs/rm"
    """Run directory: config.yaml, metrics.jsonl, checkpoint/."""


class PairOrder:
    """Which pairs each step trains on (RM and DPO): a permutation from one seeded generator, drawn
    again when the current one runs out. `position()` is JSON; built from it, the order continues
    exactly (the generator state from before the current permutation, and the offset in it)."""

    def __init__(self, n: int, batch: int, seed: int, position: dict | None = None):
        self.n, self.batch = n, batch
        self.gen = torch.Generator().manual_seed(seed)
        if position is not None:
            self.gen.set_state(unb64(position["rng"]))
        self._draw()
        self.pos = position["pos"] if position is not None else 0

    def _draw(self) -> None:
        self._rng_before = self.gen.get_state()
        self.order = torch.randperm(self.n, generator=self.gen)

    def next(self) -> torch.Tensor:
        """Indices of the next step's pairs (over all DP ranks)."""
        if self.pos + self.batch > self.n:
            self._draw()
            self.pos = 0
        self.pos += self.batch
        return self.order[self.pos - self.batch:self.pos]

    def position(self) -> dict:
        return {"rng": b64(self._rng_before), "pos": self.pos}


def encode_preferences(records, tokenizer, max_len: int) -> tuple[list[tuple], int]:
    """([(prompt ids with BOS, chosen ids + EOS, rejected ids + EOS)], pairs skipped for exceeding max_len)."""
    pairs, skipped = [], 0
    for r in records:
        prompt = tokenizer.encode(r["prompt"], add_bos=True)
        c, j = tokenizer.encode(r["chosen"], add_eos=True), tokenizer.encode(r["rejected"], add_eos=True)
        if len(prompt) + max(len(c), len(j)) > max_len:
            skipped += 1
            continue
        pairs.append((prompt, c, j))
    if not pairs:
        raise DataError(f"no preference pair fits max_len {max_len}")
    return pairs, skipped


def encode_pairs(records, tokenizer, max_len: int):
    """(chosen sequence, rejected sequence) pairs, prompt included, and the number skipped."""
    pairs, skipped = encode_preferences(records, tokenizer, max_len)
    return [(p + c, p + j) for p, c, j in pairs], skipped


def pair_batch(pairs, pad_id: int) -> dict:
    """Chosen rows then rejected rows, right-padded, with each row's last-token column."""
    seqs = [c for c, _ in pairs] + [j for _, j in pairs]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return {"input_ids": ids, "last": torch.tensor([len(s) - 1 for s in seqs])}


def bt_forward_step(total_pairs: int):
    """(output, loss_fn) for the Bradley-Terry loss, normalised by the step's pairs on every rank."""
    def step(model, mb):
        scores = model(mb["input_ids"], select=mb["last"][:, None])

        def loss_fn(scores):
            s = scores.float().squeeze(1)
            n = s.shape[0] // 2
            margin = s[:n] - s[n:]
            loss = -F.logsigmoid(margin).sum() / total_pairs
            return loss, {"loss": loss.detach(), "right": (margin > 0).sum().detach(),
                          "margin": margin.sum().detach()}

        return scores, loss_fn
    return step


def micro_batches(pairs, size: int, pad_id: int) -> list[dict]:
    return [pair_batch(pairs[i:i + size], pad_id) for i in range(0, len(pairs), size)]


def eval_batches(pairs, state, pad_id: int, batch: int = 64) -> list[dict]:
    """This DP rank's contiguous share of the held-out pairs, as micro-batches (built once)."""
    share = -(-len(pairs) // state.dp)
    return micro_batches(pairs[state.dp_rank * share:(state.dp_rank + 1) * share], batch, pad_id)


def pairwise_accuracy(handle, batches: list[dict], total_pairs: int) -> float:
    """Held-out accuracy over every DP rank (each scores its own eval_batches)."""
    state = handle.state
    right = torch.zeros((), dtype=torch.float64, device=state.device)
    for s in handle.score(bt_forward_step(1), batches) if batches else []:
        right += s["right"]
    return comm.all_reduce(right, state.dp_group).item() / total_pairs


def train_rm(cfg: RMConfig) -> list[dict]:
    validate(cfg)
    source = with_value_head(ckpt.open_source(cfg.init), head_std=0.02, seed=cfg.seed)
    source.config.validate_tp(cfg.parallel.tp)
    check_precision(cfg, source.config, cfg.parallel.tp)
    if cfg.max_len > source.config.max_position_embeddings:
        raise ConfigError(f"max_len {cfg.max_len} exceeds the model's max_position_embeddings "
                          f"({source.config.max_position_embeddings})")
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, source.config.vocab_size)
    train_pairs, skipped = encode_pairs(read_jsonl(cfg.train, PAIR_FIELDS), tokenizer, cfg.max_len)
    eval_pairs = encode_pairs(read_jsonl(cfg.eval, PAIR_FIELDS), tokenizer, cfg.max_len)[0] if cfg.eval else []
    found = resolve_resume(cfg.resume, cfg.out_dir)
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if cfg.batch_pairs % state.dp:
        raise ConfigError(f"batch_pairs ({cfg.batch_pairs}) must divide by the data-parallel size ({state.dp})")
    share = cfg.batch_pairs // state.dp
    micro = min(cfg.micro_batch_pairs or share, share)
    check_parallel(cfg.parallel, source.config, -(-share // micro))
    handle = build_handle(source, state, cfg.parallel, cfg, cfg.optim, cfg.steps, ids=lambda mb: mb["input_ids"])
    held_out = eval_batches(eval_pairs, state, tokenizer.pad_id)
    main_rank = state.rank == 0
    start, saved = resume(found, {"model": handle}, state)
    run = RunLog(cfg.out_dir, cfg, main_rank, resume_step=start if saved else None)
    order = PairOrder(len(train_pairs), cfg.batch_pairs, cfg.seed, saved and saved["order"])
    saver = Saver(cfg.checkpoint, Path(cfg.out_dir) / "checkpoints", cfg.steps, state, cfg.tokenizer)
    step_fn = bt_forward_step(cfg.batch_pairs)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"rm[{cfg.precision}]", disable=not main_rank,
               dynamic_ncols=True, initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        picked = order.next()[state.dp_rank * share:(state.dp_rank + 1) * share]
        mine = [train_pairs[i] for i in picked.tolist()]
        stats, metrics = handle.train_step(step_fn, micro_batches(mine, micro, tokenizer.pad_id))
        totals = torch.tensor([[s[k] for k in ("loss", "right", "margin")] for s in stats], dtype=torch.float64,
                              device=state.device).sum(0)
        loss, right, margin = comm.all_reduce(totals, state.dp_group).tolist()
        line = {"step": step, "loss": loss, "accuracy": right / cfg.batch_pairs, "margin": margin / cfg.batch_pairs,
                **{k: v for k, v in metrics.items() if k != "skipped"},
                "pairs_per_s": cfg.batch_pairs / (time.perf_counter() - t0), "skipped_pairs": skipped}
        if eval_pairs and (step % cfg.eval_every == 0 or step == cfg.steps):
            line["eval_accuracy"] = pairwise_accuracy(handle, held_out, len(eval_pairs))
        run.step(line)
        bar.set_postfix(loss=f"{line['loss']:.3f}", acc=f"{line.get('eval_accuracy', line['accuracy']):.3f}")
        saver.step_end(step, {"model": handle}, {"step": step, "order": order.position()})
    saver.close()
    run.close()
    ckpt.save_native(handle.chunks, state, Path(cfg.out_dir) / "checkpoint", cfg.tokenizer)
    return run.history


def main(argv: list[str]) -> int:
    cfg = parse_run_args(RMConfig, argv, "trident rm", "Reward-model training (Bradley-Terry).")
    history = train_rm(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        evals = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
        print(json.dumps({"steps": cfg.steps, "eval_accuracy": evals[-1] if evals else None, "out_dir": cfg.out_dir}))
    return 0
