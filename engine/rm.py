"""`trident rm`: reward-model training with the Bradley-Terry pairwise loss.

Data: JSONL with `prompt`, `chosen`, `rejected`. The model is a scalar-head decoder; a sequence's
score is the head's value at its last token (the EOS after the response). Loss: -log sigmoid(s_c - s_r).
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
from engine.config import parse_run_args
from engine.data import read_jsonl
from engine.errors import DataError
from engine.model import Transformer
from engine.ppo import _CriticSource
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from engine.train import DTYPES, OptimConfig, ParallelConfig, lr_at, save_checkpoint
from parallel.grads import clip_grads, finalize_tp_grads
from parallel.optimizer import MasterWeightAdamW, param_groups
from parallel.state import init_parallel


@dataclass
class RMConfig:
    init: str = "runs/demo_sft/checkpoint"
    """Checkpoint to start from (a policy: its LM head is replaced by a zero scalar head)."""
    tokenizer: str = "data/tokenizer.model"
    train: str = "data/prefs_train.jsonl"
    eval: str | None = "data/prefs_eval.jsonl"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=5e-5, warmup_steps=10,
                                                                      weight_decay=0.0))
    steps: int = 200
    batch_pairs: int = 32
    """Preference pairs per optimizer step."""
    max_len: int = 64
    """Longest prompt + response; longer pairs are skipped (and counted)."""
    eval_every: int = 50
    seed: int = 0
    dtype: str = "fp32"
    out_dir: str = "runs/rm"


def encode_pairs(records, tokenizer, max_len: int):
    pairs, skipped = [], 0
    for r in records:
        prompt = tokenizer.encode(r["prompt"], add_bos=True)
        c = prompt + tokenizer.encode(r["chosen"], add_eos=True)
        j = prompt + tokenizer.encode(r["rejected"], add_eos=True)
        if max(len(c), len(j)) > max_len:
            skipped += 1
            continue
        pairs.append((c, j))
    if not pairs:
        raise DataError(f"no preference pair fits max_len {max_len}")
    return pairs, skipped


def pair_batch(pairs, pad_id: int):
    """Chosen rows then rejected rows, right-padded, with each row's last-token column."""
    seqs = [c for c, _ in pairs] + [j for _, j in pairs]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def pair_scores(model, pairs, pad_id):
    ids, last = pair_batch(pairs, pad_id)
    scores = model(ids, select=last[:, None]).float().squeeze(1)
    n = len(pairs)
    return scores[:n], scores[n:]


@torch.no_grad()
def pairwise_accuracy(model, pairs, pad_id, batch: int = 64) -> float:
    model.eval()
    right = 0
    for i in range(0, len(pairs), batch):
        c, j = pair_scores(model, pairs[i:i + batch], pad_id)
        right += int((c > j).sum())
    model.train()
    return right / len(pairs)


def train_rm(cfg: RMConfig) -> list[dict]:
    source = ckpt.open_source(cfg.init)
    source.config.validate_tp(cfg.parallel.tp)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, source.config.vocab_size)
    train_pairs, skipped = encode_pairs(read_jsonl(cfg.train, ("prompt", "chosen", "rejected")), tokenizer, cfg.max_len)
    eval_pairs = encode_pairs(read_jsonl(cfg.eval, ("prompt", "chosen", "rejected")), tokenizer, cfg.max_len)[0] \
        if cfg.eval else []
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    model_cfg = source.config
    if not model_cfg.value_head:
        model_cfg, source = type(model_cfg)(**{**vars(model_cfg), "value_head": True}), _CriticSource(source, head_std=0.02, seed=cfg.seed)
    model = Transformer(model_cfg, state, sequence_parallel=cfg.parallel.sequence_parallel,
                        recompute=cfg.parallel.recompute, dtype=DTYPES[cfg.dtype])
    ckpt.load_into(model, source)
    opt = MasterWeightAdamW(param_groups(model.named_parameters(), cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    params = [p for p in model.parameters() if p.requires_grad]
    out = Path(cfg.out_dir)
    main_rank = state.rank == 0
    run = RunLog(cfg.out_dir, cfg, main_rank)
    log = run.log

    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(len(train_pairs), generator=gen), 0
    bar = tqdm(range(1, cfg.steps + 1), desc="rm", disable=not main_rank, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        if pos + cfg.batch_pairs > len(order):
            order, pos = torch.randperm(len(train_pairs), generator=gen), 0
        batch = [train_pairs[i] for i in order[pos:pos + cfg.batch_pairs].tolist()]
        pos += cfg.batch_pairs
        chosen, rejected = pair_scores(model, batch, tokenizer.pad_id)
        loss = -F.logsigmoid(chosen - rejected).mean()
        loss.backward()
        finalize_tp_grads(params)
        norm = clip_grads(params, cfg.optim.clip_grad, [state.tp_group])
        lr = lr_at(step - 1, cfg.optim, cfg.steps)
        opt.set_lr(lr)
        opt.step()
        opt.zero_grad()
        line = {"step": step, "loss": loss.item(), "accuracy": float((chosen > rejected).float().mean()),
                "margin": float((chosen - rejected).detach().mean()), "lr": lr, "grad_norm": norm,
                "pairs_per_s": len(batch) / (time.perf_counter() - t0), "skipped_pairs": skipped}
        if eval_pairs and (step % cfg.eval_every == 0 or step == cfg.steps):
            line["eval_accuracy"] = pairwise_accuracy(model, eval_pairs, tokenizer.pad_id)
        log(line)
        bar.set_postfix(loss=f"{line['loss']:.3f}", acc=f"{line.get('eval_accuracy', line['accuracy']):.3f}")
    run.close()
    save_checkpoint(model, state, out / "checkpoint", cfg.tokenizer)
    return run.history


def main(argv: list[str]) -> int:
    cfg = parse_run_args(RMConfig, argv, "trident rm", "Reward-model training (Bradley-Terry).")
    history = train_rm(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        evals = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
        print(json.dumps({"steps": cfg.steps, "eval_accuracy": evals[-1] if evals else None, "out_dir": cfg.out_dir}))
    return 0
