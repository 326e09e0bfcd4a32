"""`trident dpo`: Direct Preference Optimization (Rafailov et al. 2023) at any TP x PP x DP.

Data: the reward model's JSONL (`prompt`, `chosen`, `rejected`). A response's log-probability is the sum
of its tokens' log-probs (EOS included) given the prompt. The frozen reference scores every train and
held-out pair once, before training (each DP rank its share, all-gathered), and is then freed. Loss per
pair, with h = (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)):
  sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label_smoothing, cDPO)
  ipo:     (h - 1 / (2 beta))^2                                        (Azar et al. 2023)
averaged over the step's pairs on every DP rank (plus, with nll_coef, the chosen response's per-token NLL). Implicit rewards are beta (log pi - log ref); held-out
preference accuracy is the share of pairs whose chosen reward is the higher one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.build import build_handle, check_parallel, check_precision
from engine.config import parse_run_args, validate
from engine.data import read_jsonl
from engine.errors import ConfigError
from engine.experience import action_log_probs_and_entropy, build_experience
from engine.rm import PAIR_FIELDS, PairOrder, PairSettings, encode_preferences
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from engine.train_state import Saver, resolve_resume, resume
from parallel import comm
from parallel.config import Fraction, NonNegFloat, PositiveFloat, PositiveInt
from parallel.optimizer import OptimConfig
from parallel.state import init_parallel


@dataclass
class DPOConfig(PairSettings):
    init: str = "runs/demo_sft/checkpoint"
    """The policy to train: native checkpoint or HF directory."""
    ref: str | None = None
    """The frozen reference policy (None: `init` itself, as in TRL and OpenRLHF)."""
    eval: str | None = "data/prefs_eval.jsonl"
    """Held-out pairs for preference accuracy and reward margin (None: no evaluation)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10,
                                                                      weight_decay=0.0))
    """AdamW and its schedule."""
    beta: PositiveFloat = 0.1
    """Strength of the implicit KL to the reference (TRL / OpenRLHF beta)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's logistic loss; ipo: IPO's squared loss (Azar et al. 2023), which does not push the
    margin to infinity on separable data."""
    label_smoothing: Fraction = 0.0
    """Assumed share of flipped labels (conservative DPO, Mitchell 2023; TRL / OpenRLHF label_smoothing);
    sigmoid loss only."""
    nll_coef: NonNegFloat = 0.0
    """Weight of the chosen responses' per-token NLL added to the loss (RPO, Pang et al. 2024; TRL
    rpo_alpha, OpenRLHF nll_loss_coef): keeps the chosen answers likely while their margin grows."""
    eval_every: PositiveInt = 50
    """Evaluate every N steps (and before the first and after the last)."""
    seed: int = 0
    """Seeds the pair order."""
    out_dir: str = "runs/dpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoint/ (native), hf/."""
    export_hf: bool = True
    """Write the trained policy as an HF directory (out_dir/hf) besides the native checkpoint."""


@dataclass
class PairBatch:
    """Pairs as 2n rows, chosen then rejected: prompt + response, right-padded (see engine/experience)."""
    input_ids: torch.Tensor
    action_index: torch.Tensor
    action_mask: torch.Tensor
    ref_logp: torch.Tensor | None = None  # [2n] the reference's summed response log-probs


def pair_batch(pairs: list[tuple], pad_id: int, ref_logp: torch.Tensor | None = None) -> PairBatch:
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    exp = build_experience(prompts, responses, torch.ones(len(prompts), dtype=torch.bool), pad_id)
    ref = None if ref_logp is None else torch.cat([ref_logp[:, 0], ref_logp[:, 1]])
    return PairBatch(exp.input_ids, exp.action_index, exp.action_mask, ref)


def sequence_logps(model, logits, mb: PairBatch) -> torch.Tensor:
    """Each row's summed response log-prob [2n], fp32 and vocab-parallel."""
    logp, _ = action_log_probs_and_entropy(model, logits, mb)
    return (logp * mb.action_mask).sum(-1)


def ref_logp_step(model, mb: PairBatch):
    logits = model(mb.input_ids, select=mb.action_index)
    return logits, lambda o: (o.new_zeros(()), {"out": sequence_logps(model, o, mb)})


def dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards (chosen, rejected) from [2n] summed log-probs of the
    policy and the reference, chosen rows first."""
    n = logp.shape[0] // 2
    chosen, rejected = beta * (logp[:n] - ref_logp[:n]), beta * (logp[n:] - ref_logp[n:])
    h = (chosen - rejected) / beta
    if loss_type == "ipo":
        loss = (h - 1 / (2 * beta)).square()
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, chosen.detach(), rejected.detach()


def dpo_forward_step(cfg: DPOConfig, total_pairs: int):
    """(output, loss_fn): the DPO loss summed over the micro-batch's pairs / the step's pairs on every rank."""
    def step(model, mb: PairBatch):
        logits = model(mb.input_ids, select=mb.action_index)

        def loss_fn(logits):
            logp = sequence_logps(model, logits, mb)
            loss, chosen, rejected = dpo_loss(logp, mb.ref_logp, cfg.beta, cfg.loss, cfg.label_smoothing)
            if cfg.nll_coef:
                n = logp.shape[0] // 2
                loss = loss - cfg.nll_coef * logp[:n] / mb.action_mask[:n].sum(-1)
            loss = loss.sum() / total_pairs
            margin = chosen - rejected
            return loss, {"loss": loss.detach(), "right": (margin > 0).sum(), "margin": margin.sum(),
                          "chosen_reward": chosen.sum(), "rejected_reward": rejected.sum()}

        return logits, loss_fn
    return step


def micro_batches(pairs, ref: torch.Tensor, size: int, pad_id: int) -> list[PairBatch]:
    return [pair_batch(pairs[i:i + size], pad_id, ref[i:i + size]) for i in range(0, len(pairs), size)]


def reference_logps(handle, pairs, state, pad_id: int, batch: int = 64) -> torch.Tensor:
    """[len(pairs), 2] summed log-probs (chosen, rejected) of the frozen reference: each DP rank scores
    its contiguous share once, then every rank gets them all (one all-gather)."""
    share = -(-len(pairs) // state.dp)
    mine = pairs[state.dp_rank * share:(state.dp_rank + 1) * share]
    out = torch.zeros(share, 2, device=state.device)
    for i in range(0, len(mine), batch):
        stats = handle.score(ref_logp_step, [pair_batch(mine[i:i + batch], pad_id)])
        rows = stats[0]["out"]
        n = rows.shape[0] // 2
        out[i:i + n] = torch.stack([rows[:n], rows[n:]], 1)
    return comm.all_gather(out, state.dp_group, 0)[: len(pairs)]


def totals(stats: list[dict], state) -> dict:
    keys = ("loss", "right", "margin", "chosen_reward", "rejected_reward")
    sums = torch.tensor([[float(s[k]) for k in keys] for s in stats] or [[0.0] * len(keys)], dtype=torch.float64,
                        device=state.device).sum(0)
    return dict(zip(keys, comm.all_reduce(sums, state.dp_group).tolist()))


def evaluate(handle, cfg: DPOConfig, pairs, ref, state, pad_id: int) -> dict:
    """Held-out preference accuracy and mean reward margin over every DP rank's share of the pairs."""
    share = -(-len(pairs) // state.dp)
    lo = state.dp_rank * share
    mine = micro_batches(pairs[lo:lo + share], ref[lo:lo + share], 64, pad_id)
    t = totals(handle.score(dpo_forward_step(cfg, len(pairs)), mine) if mine else [], state)
    return {"eval_accuracy": t["right"] / len(pairs), "eval_margin": t["margin"] / len(pairs),
            "eval_loss": t["loss"]}


def train_dpo(cfg: DPOConfig) -> list[dict]:
    validate(cfg)
    if cfg.label_smoothing and cfg.loss != "sigmoid":
        raise ConfigError("label_smoothing goes with loss=sigmoid")
    source = ckpt.open_source(cfg.init)
    ref_source = ckpt.open_source(cfg.ref) if cfg.ref else source
    for s in (source, ref_source):
        if s.config.value_head:
            raise ConfigError("dpo trains a policy: the checkpoint has a scalar head (a reward model or critic)")
        s.config.validate_tp(cfg.parallel.tp)
        check_precision(cfg, s.config, cfg.parallel.tp)
    if ref_source.config.vocab_size != source.config.vocab_size:
        raise ConfigError(f"the reference's vocab ({ref_source.config.vocab_size}) is not the policy's "
                          f"({source.config.vocab_size})")
    if cfg.max_len > source.config.max_position_embeddings:
        raise ConfigError(f"max_len {cfg.max_len} exceeds the model's max_position_embeddings "
                          f"({source.config.max_position_embeddings})")
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, source.config.vocab_size)
    train_pairs, skipped = encode_preferences(read_jsonl(cfg.train, PAIR_FIELDS), tokenizer, cfg.max_len)
    eval_pairs = encode_preferences(read_jsonl(cfg.eval, PAIR_FIELDS), tokenizer, cfg.max_len)[0] if cfg.eval else []
    found = resolve_resume(cfg.resume, cfg.out_dir)
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if cfg.batch_pairs % state.dp:
        raise ConfigError(f"batch_pairs ({cfg.batch_pairs}) must divide by the data-parallel size ({state.dp})")
    share = cfg.batch_pairs // state.dp
    micro = min(cfg.micro_batch_pairs or share, share)
    check_parallel(cfg.parallel, source.config, -(-share // micro))
    ids = lambda mb: mb.input_ids  # noqa: E731
    t0 = time.perf_counter()
    ref_handle = build_handle(ref_source, state, cfg.parallel, cfg, None, ids=ids)
    ref_train = reference_logps(ref_handle, train_pairs, state, tokenizer.pad_id)
    ref_eval = reference_logps(ref_handle, eval_pairs, state, tokenizer.pad_id) if eval_pairs else None
    del ref_handle  # scored once: its memory goes back before the policy trains
    ref_s = time.perf_counter() - t0
    handle = build_handle(source, state, cfg.parallel, cfg, cfg.optim, cfg.steps, ids=ids)
    main_rank = state.rank == 0
    start, saved = resume(found, {"model": handle}, state)
    run = RunLog(cfg.out_dir, cfg, main_rank, resume_step=start if saved else None)
    if eval_pairs and start == 0:
        run.log({"step": 0, **evaluate(handle, cfg, eval_pairs, ref_eval, state, tokenizer.pad_id),
                 "ref_scoring_s": ref_s})
    order = PairOrder(len(train_pairs), cfg.batch_pairs, cfg.seed, saved and saved["order"])
    saver = Saver(cfg.checkpoint, Path(cfg.out_dir) / "checkpoints", cfg.steps, state, cfg.tokenizer)
    step_fn = dpo_forward_step(cfg, cfg.batch_pairs)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"dpo[{cfg.precision}]", disable=not main_rank,
               dynamic_ncols=True, initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        picked = order.next()[state.dp_rank * share:(state.dp_rank + 1) * share]
        mine = [train_pairs[i] for i in picked.tolist()]
        ref = ref_train[picked.to(state.device)]
        stats, metrics = handle.train_step(step_fn, micro_batches(mine, ref, micro, tokenizer.pad_id))
        t = totals(stats, state)
        n = cfg.batch_pairs
        line = {"step": step, "loss": t["loss"], "accuracy": t["right"] / n, "margin": t["margin"] / n,
                "chosen_reward": t["chosen_reward"] / n, "rejected_reward": t["rejected_reward"] / n,
                **{k: v for k, v in metrics.items() if k != "skipped"},
                "pairs_per_s": n / (time.perf_counter() - t0), "skipped_pairs": skipped}
        if eval_pairs and (step % cfg.eval_every == 0 or step == cfg.steps):
            line.update(evaluate(handle, cfg, eval_pairs, ref_eval, state, tokenizer.pad_id))
        run.step(line)
        bar.set_postfix(loss=f"{line['loss']:.3f}", acc=f"{line.get('eval_accuracy', line['accuracy']):.3f}")
        saver.step_end(step, {"model": handle}, {"step": step, "order": order.position()})
    saver.close()
    run.close()
    out = Path(cfg.out_dir)
    ckpt.save_native(handle.chunks, state, out / "checkpoint", cfg.tokenizer)
    if main_rank and cfg.export_hf:
        from engine.hf_export import native_to_hf
        native_to_hf(str(out / "checkpoint"), str(out / "hf"), force=True)
    return run.history


def main(argv: list[str]) -> int:
    cfg = parse_run_args(DPOConfig, argv, "trident dpo", "Direct Preference Optimization on preference pairs.")
    history = train_dpo(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        evals = [h for h in history if "eval_accuracy" in h]
        summary = {"steps": cfg.steps, "out_dir": cfg.out_dir}
        if evals:
            summary.update(eval_accuracy_first=evals[0]["eval_accuracy"], eval_accuracy=evals[-1]["eval_accuracy"],
                           eval_margin=evals[-1]["eval_margin"])
        print(json.dumps(summary))
    return 0
