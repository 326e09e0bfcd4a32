"""`trident train`: pretraining and SFT on JSONL at any TP x PP x DP, with packing and accumulation.

  trident train --config tools/configs/demo_sft.yaml --optim.lr=3e-4 --precision=bf16
  torchrun --nproc-per-node 2 -m engine.cli train --config ... --parallel.tp=2
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine import train_state
from engine.build import build_handle, check_parallel, check_precision
from engine.config import ModelConfig, ParallelConfig, PrecisionSettings, parse_run_args, validate
from engine.data import IGNORE, StepBatches, attention_mask_from_doc_ids, pack_documents, read_jsonl, tokenize_documents
from engine.errors import ConfigError
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from engine.train_state import CheckpointConfig
from parallel import comm
from parallel.config import PositiveInt
from parallel.handle import ModelHandle, to_device
from parallel.layers import vocab_parallel_cross_entropy
from parallel.optimizer import OptimConfig, lr_at  # noqa: F401  (lr_at: the schedule the handle follows)
from parallel.state import init_parallel


@dataclass
class DataConfig:
    path: str = "data/arith_sft.jsonl"
    """JSONL file: {"text"} records for pretraining, {"prompt", "response"} for SFT."""
    mode: Literal["sft", "pretrain"] = "sft"
    """sft (loss on response tokens only) or pretrain (loss on every token)."""
    tokenizer: str = "data/tokenizer.model"
    """A sentencepiece .model, an HF tokenizer.json, or a directory holding one."""
    seq_len: PositiveInt = 64
    """Tokens per packed row (at most the model's max_position_embeddings); documents never attend
    across each other within a row."""


@dataclass
class TrainConfig(PrecisionSettings):
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (ignored when `init` names a checkpoint, whose config wins)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / DP layout, sequence parallelism, recomputation, compilation."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset and how it is packed."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its warmup + cosine schedule."""
    init: str | None = None
    """HF directory or native checkpoint to start from; None: random init from `seed`."""
    steps: PositiveInt = 100
    """Optimizer steps."""
    micro_batch_size: PositiveInt = 8
    """Packed rows per forward/backward."""
    grad_accum: PositiveInt = 1
    """Micro-batches accumulated per optimizer step (per data-parallel rank)."""
    seed: int = 0
    """Seeds the init and the data order (identical across TP ranks)."""
    out_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, checkpoint/."""
    save: bool = True
    """Write the final weights as a native checkpoint to out_dir/checkpoint at the end."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training-state checkpoints (out_dir/checkpoints/step-N): how often, how many kept."""
    resume: str | None = None
    """Resume from a training-state checkpoint, a checkpoints directory or a run directory (its
    `latest`), into any layout; a weights-only checkpoint loads with fresh optimizer state. Unset, a
    run directory that already holds checkpoints resumes from its latest."""


def resolve_model(cfg: TrainConfig):
    """(weights source, model config), checked against the parallel sizes, the precision and the data
    before any process group, model or run directory exists."""
    validate(cfg)
    source = ckpt.open_source(cfg.init) if cfg.init else ckpt.RandomSource(cfg.model, cfg.seed)
    model_cfg = source.config
    check_parallel(cfg.parallel, model_cfg, cfg.grad_accum)
    check_precision(cfg, model_cfg, cfg.parallel.tp)
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"({model_cfg.max_position_embeddings})")
    return source, model_cfg


def lm_forward_step(model, mb: dict):
    """(output, loss_fn) for the language-model loss. The summed token losses are divided by the whole
    step's token count over every DP rank (mb["num_tokens"]): accumulated over micro-batches and
    summed over ranks that is the exact per-token mean of the step."""
    # packed rows carry doc_ids (no attention across documents); rows without them are plainly causal
    mask = attention_mask_from_doc_ids(mb["doc_ids"]) if "doc_ids" in mb else None
    logits = model(mb["input_ids"], mb["position_ids"], mask)

    def loss_fn(logits):
        labels = mb["labels"]
        token_loss = vocab_parallel_cross_entropy(logits, labels, model.state.tp_group, model.vocab_start)
        loss = (token_loss * (labels != IGNORE)).sum() / mb["num_tokens"]
        return loss, {"loss": loss.detach()}

    return logits, loss_fn


def train_step(handle: ModelHandle, micro_batches: list[dict]) -> dict:
    """One optimizer step on this rank's micro-batches; returns the step's metrics (loss over every DP
    rank; gradient norm, LR and, for fp16, the loss scale from the handle)."""
    state = handle.state
    micro = [to_device(mb, state.device) for mb in micro_batches]
    num_tokens = torch.stack([(mb["labels"] != IGNORE).sum() for mb in micro]).sum().double()
    comm.all_reduce(num_tokens, state.dp_group)
    for mb in micro:
        mb["num_tokens"] = num_tokens.clamp(min=1.0)
    stats, metrics = handle.train_step(lm_forward_step, micro)
    loss = sum(s["loss"] for s in stats)  # this rank's share of the global per-token mean
    if state.dp > 1:
        loss = comm.all_reduce(torch.tensor(loss, dtype=torch.float64, device=state.device), state.dp_group).item()
    return {"loss": loss, **metrics}


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the metrics lines (also written to out_dir/metrics.jsonl on rank 0)."""
    source, model_cfg = resolve_model(cfg)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab(tokenizer, model_cfg.vocab_size)
    docs = tokenize_documents(read_jsonl(cfg.data.path), tokenizer, cfg.data.mode, cfg.data.seq_len)
    data = pack_documents(docs, cfg.data.seq_len, tokenizer.pad_id)
    found = train_state.resolve_resume(cfg.resume, cfg.out_dir)
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    handle = build_handle(source, state, cfg.parallel, cfg, cfg.optim, cfg.steps, ids=lambda mb: mb["input_ids"],
                          seed=cfg.seed)
    main_rank = state.rank == 0
    start, saved = train_state.resume(found, {"model": handle}, state)
    position = saved["data"] if saved else {"epoch": 0, "offset": 0, "seed": cfg.seed}
    stream = StepBatches(data, cfg.micro_batch_size, cfg.grad_accum, position["seed"], state.dp_rank, state.dp,
                         position["epoch"], position["offset"])
    run = RunLog(cfg.out_dir, cfg, main_rank, resume_step=start if found[0] is not None else None)
    saver = train_state.Saver(cfg.checkpoint, Path(cfg.out_dir) / "checkpoints", cfg.steps, state, cfg.data.tokenizer)

    bar = tqdm(range(start, cfg.steps), desc=f"train[{cfg.precision}]", disable=not main_rank, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        micro_batches = next(stream)
        line = {"step": step + 1, **train_step(handle, micro_batches)}
        tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * state.dp
        line["tokens_per_s"] = tokens / (time.perf_counter() - t0)
        line.pop("skipped", None)
        run.step(line)
        bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{line['lr']:.2e}")
        saver.step_end(step + 1, {"model": handle}, lambda: {"step": step + 1, "data": stream.position(),
                                                            "samples": stream.per_step * (step + 1)})
    saver.close()
    run.close()
    if cfg.save:
        ckpt.save_native(handle.chunks, state, Path(cfg.out_dir) / "checkpoint", cfg.data.tokenizer)
    return run.history


def main(argv: list[str]) -> int:
    cfg = parse_run_args(TrainConfig, argv, "trident train", "Pretraining / SFT.",
                         epilog="example: trident train --config tools/configs/demo_sft.yaml --parallel.tp=2 --steps=50")
    history = train(cfg)
    if history and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_loss": history[-1]["loss"], "steps": len(history), "out_dir": cfg.out_dir}))
    return 0
