"""`trident train`: pretraining and SFT on JSONL, tensor-parallel, with packing and accumulation.

  trident train --config tools/configs/demo_sft.yaml --optim.lr=3e-4
  torchrun --nproc-per-node 2 -m engine.cli train --config ... --parallel.tp=2
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.config import ModelConfig, parse_run_args
from engine.data import (IGNORE, attention_mask_from_doc_ids, batches, pack_documents, read_jsonl,
                         tokenize_documents)
from engine.errors import ConfigError
from engine.model import Transformer
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from parallel import comm
from parallel.grads import clip_grads, finalize_tp_grads
from parallel.layers import vocab_parallel_cross_entropy
from parallel.optimizer import MasterWeightAdamW, param_groups
from parallel.pipeline import forward_backward_no_pipelining
from parallel.state import ParallelState, init_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (must divide the number of heads)."""
    pp: int = 1
    """Pipeline-parallel size."""
    sequence_parallel: bool = False
    """Split the residual stream along the sequence across TP ranks (saves activation memory)."""
    recompute: bool = False
    """Recompute each decoder layer in backward instead of storing its activations."""


@dataclass
class DataConfig:
    path: str = "data/arith_sft.jsonl"
    """JSONL file: {"text"} records for pretraining, {"prompt", "response"} for SFT."""
    mode: str = "sft"
    """sft (loss on response tokens only) or pretrain (loss on every token)."""
    tokenizer: str = "data/tokenizer.model"
    """A sentencepiece .model, an HF tokenizer.json, or a directory holding one."""
    seq_len: int = 64
    """Tokens per packed row; documents never attend across each other within a row."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Floor of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (ignored when `init` names a checkpoint, whose config wins)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init: str | None = None
    """HF directory or native checkpoint to start from; None: random init from `seed`."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Packed rows per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per data-parallel rank)."""
    dtype: str = "fp32"
    """Parameter/activation dtype: fp32, bf16 or fp16 (low precision keeps fp32 master weights)."""
    seed: int = 0
    """Seeds the init and the data order (identical across TP ranks)."""
    out_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, checkpoint/."""
    save: bool = True
    """Write a native checkpoint to out_dir/checkpoint at the end."""


def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup then cosine decay to min_lr (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def resolve_model(cfg: TrainConfig):
    """(weights source or None, model config), validated against the parallel sizes before any
    process group exists."""
    source = ckpt.open_source(cfg.init) if cfg.init else None
    model_cfg = source.config if source else cfg.model
    model_cfg.validate_tp(cfg.parallel.tp)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    return source, model_cfg


def build_model(cfg: TrainConfig, state: ParallelState) -> Transformer:
    """The model for this rank, initialised from `cfg.init` or randomly (same weights at any TP)."""
    source, model_cfg = resolve_model(cfg)
    model = Transformer(model_cfg, state, sequence_parallel=cfg.parallel.sequence_parallel,
                        recompute=cfg.parallel.recompute, dtype=DTYPES[cfg.dtype])
    ckpt.load_into(model, source or ckpt.RandomSource(model_cfg, cfg.seed))
    return model


def lm_forward_step(model: Transformer, mb: dict):
    """(output, loss_fn) for the language-model loss. The summed token losses are divided by the whole
    step's token count (mb["num_tokens"]): accumulated over micro-batches that is the exact per-token
    mean of the step."""
    logits = model(mb["input_ids"], mb["position_ids"], attention_mask_from_doc_ids(mb["doc_ids"]))

    def loss_fn(logits):
        labels = mb["labels"]
        token_loss = vocab_parallel_cross_entropy(logits, labels, model.state.tp_group, model.vocab_start)
        loss = (token_loss * (labels != IGNORE)).sum() / mb["num_tokens"]
        return loss, {"loss": loss.item()}

    return logits, loss_fn


def save_checkpoint(model: Transformer, state: ParallelState, out: Path, tokenizer_path: str | None = None) -> None:
    staging = ckpt.staging_dir(out)
    if state.rank == 0:
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    comm.barrier()
    if state.dp_rank == 0:
        ckpt.save_rank_shard(model, staging, state.tp_rank, state.pp_rank)
    comm.barrier()
    if state.rank == 0:
        dtype = ckpt._dtype_name(model.dtype)
        stages = [model.layer_ids]  # pp == 1 here; the 3D work passes every stage's range
        ckpt.write_index(staging, model.cfg, state.tp, stages, lambda _: dtype)
        tok = Path(tokenizer_path) if tokenizer_path else None
        if tok and tok.is_file():
            import shutil
            name = "tokenizer.model" if tok.suffix == ".model" else "tokenizer.json"
            shutil.copyfile(tok, staging / name)
        ckpt.publish(staging, out)
    comm.barrier()


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the metrics lines (also written to out_dir/metrics.jsonl on rank 0)."""
    resolve_model(cfg)
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if state.pp > 1:
        raise ConfigError("pipeline parallelism (pp > 1) is not available in train yet")
    # Everything that can fail on bad input happens before the run directory exists.
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    records = read_jsonl(cfg.data.path)
    docs = tokenize_documents(records, tokenizer, cfg.data.mode, cfg.data.seq_len)
    data = pack_documents(docs, cfg.data.seq_len, tokenizer.pad_id)
    model = build_model(cfg, state)
    check_vocab(tokenizer, model.cfg.vocab_size)
    steps_iter = batches(data, cfg.micro_batch_size, cfg.grad_accum, cfg.seed, state.dp_rank, state.dp)
    optimizer = MasterWeightAdamW(param_groups(model.named_parameters(), cfg.optim.weight_decay),
                                  lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    out = Path(cfg.out_dir)
    main_rank = state.rank == 0
    run = RunLog(cfg.out_dir, cfg, main_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(range(cfg.steps), desc="train", disable=not main_rank, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        micro_batches = next(steps_iter)
        num_tokens = torch.tensor(float(sum(int((mb["labels"] != IGNORE).sum()) for mb in micro_batches)))
        comm.all_reduce(num_tokens, state.dp_group)
        model.train()
        for mb in micro_batches:
            mb["num_tokens"] = max(1.0, num_tokens.item())
        stats = forward_backward_no_pipelining(lm_forward_step, model, micro_batches)
        loss_sum = sum(s["loss"] for s in stats)
        finalize_tp_grads(params)
        grad_norm = clip_grads(params, cfg.optim.clip_grad, [state.tp_group])
        lr = lr_at(step, cfg.optim, cfg.steps)
        optimizer.set_lr(lr)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = time.perf_counter() - t0
        tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * state.dp
        line = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed}
        run.log(line)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
    run.close()
    if cfg.save:
        save_checkpoint(model, state, out / "checkpoint", cfg.data.tokenizer)
    return run.history


def main(argv: list[str]) -> int:
    cfg = parse_run_args(TrainConfig, argv, "trident train", "Pretraining / SFT.",
                         epilog="example: trident train --config tools/configs/demo_sft.yaml --parallel.tp=2 --steps=50")
    history = train(cfg)
    if history and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_loss": history[-1]["loss"], "steps": len(history), "out_dir": cfg.out_dir}))
    return 0
