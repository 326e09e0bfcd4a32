"""PPO experience: a rollout turned into tensors, and the step functions that score it and update on it,
in the schedule's `(output, loss_fn)` contract.

Sequences are prompt + response, right-padded (causal attention means padding never affects real
tokens, so no mask is needed). Response token j of row i sits at column len(prompt_i) + j and is
predicted by the logits at column len(prompt_i) + j - 1: `action_index` holds those columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import rl_math
from parallel.layers import vocab_parallel_log_probs_and_entropy


@dataclass
class Experience:
    input_ids: torch.Tensor      # [B, L]
    action_index: torch.Tensor   # [B, R] column of the logits predicting each response token
    action_mask: torch.Tensor    # [B, R] 1 on real response tokens of valid samples
    last_index: torch.Tensor     # [B] column of each sequence's last real token
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None   # [B, R] token rewards (score on the last token, KL penalty)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> "Experience":
        return Experience(**{k: None if v is None else v[idx] for k, v in vars(self).items()})

    def micro_batches(self, size: int, rows: torch.Tensor | None = None) -> list["Experience"]:
        """`rows` (default: all, in order) cut into micro-batches of at most `size` rows."""
        rows = torch.arange(len(self), device=self.input_ids.device) if rows is None else rows
        return [self.select(i) for i in rows.split(size)]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_experience(prompts: list[list[int]], responses: list[list[int]], valid: torch.Tensor,
                     pad_id: int) -> Experience:
    """The rollout's tensors, built on the host (move them with parallel.handle.to_device)."""
    b = len(prompts)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    rlen = max(1, max(len(r) for r in responses))
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    action_index = torch.zeros(b, rlen, dtype=torch.long)
    action_mask = torch.zeros(b, rlen)
    last = torch.zeros(b, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        action_index[i, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        action_mask[i, : len(r)] = float(valid[i])
        last[i] = len(p) + len(r) - 1
    return Experience(ids, action_index, action_mask, last)


def action_log_probs_and_entropy(model, logits: torch.Tensor, exp: Experience, temperature: float = 1.0):
    """Log-probs of the response tokens and the policy's entropy at each, [B, R] each (vocab-parallel,
    fp32, of softmax(logits / temperature)), from the logits at the positions that predict them
    (`model(..., select=exp.action_index)`)."""
    targets = exp.input_ids.gather(1, exp.action_index + 1)
    return vocab_parallel_log_probs_and_entropy(logits, targets, model.state.tp_group, model.vocab_start,
                                                temperature)


# ---- scoring (forward only): results travel as the loss_fn's "out" stat --------------------------------

def _scoring(compute, select):
    def step(model, mb):
        out = model(mb.input_ids, select=select(mb))
        return out, lambda o: (o.new_zeros(()), {"out": compute(model, o, mb)})
    return step


def logprob_step(temperature: float):
    """Scores the response tokens' log-probs [b, R] (actor's old log-probs, the reference's)."""
    return _scoring(lambda m, logits, mb: action_log_probs_and_entropy(m, logits, mb, temperature)[0],
                    lambda mb: mb.action_index)


def value_step():
    """Scores the critic's values at the positions that predict the response tokens [b, R]."""
    return _scoring(lambda m, values, mb: values.float(), lambda mb: mb.action_index)


def last_value_step():
    """Scores a reward model's value at each sequence's last token [b]."""
    return _scoring(lambda m, values, mb: values.float().squeeze(1), lambda mb: mb.last_index[:, None])


def gather_out(stats: list[dict]) -> torch.Tensor:
    return torch.cat([s["out"] for s in stats])


# ---- updates ---------------------------------------------------------------------------------------

def actor_forward_step(cfg, temperature: float, norm: rl_math.LossNorm):
    """Step function for the policy: clipped surrogate + optional KL loss - entropy bonus, each
    aggregated by cfg.loss_agg over the minibatch that `norm` counts (this micro-batch's share of it)."""

    def step(model, exp: Experience):
        logits = model(exp.input_ids, select=exp.action_index)

        def loss_fn(logits):
            logp, token_entropy = action_log_probs_and_entropy(model, logits, exp, temperature)
            mask = exp.action_mask
            loss, stats = rl_math.policy_loss(logp, exp.old_logp, exp.advantages, mask, *cfg.clip_range(),
                                              cfg.dual_clip, cfg.log_ratio_clamp, cfg.loss_agg, norm)
            if cfg.kl_mode == "loss":
                kl = rl_math.kl_penalty(logp, exp.ref_logp, cfg.kl_estimator, cfg.kl_clamp)
                loss = loss + cfg.kl_coef * rl_math.agg_loss(kl, mask, cfg.loss_agg, norm)
            stats.update(policy_loss=loss.detach(),
                         entropy=rl_math.agg_loss(token_entropy.detach(), mask, "token-mean", norm))
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * rl_math.agg_loss(token_entropy, mask, cfg.loss_agg, norm)
            return loss, stats

        return logits, loss_fn

    return step


def critic_forward_step(cfg, norm: rl_math.LossNorm, returns_of=None):
    """Step function for the critic: clipped value loss (aggregated like the actor's). Without old
    values in the experience (a single on-policy update) the pass scores the rollout itself: its values
    before this update are the old values, and `returns_of(mb, values)` turns them into the returns
    (the trainer's GAE)."""

    def step(model, exp: Experience):
        values = model(exp.input_ids, select=exp.action_index)

        def loss_fn(values):
            values = values.float()
            old, returns = exp.old_values, exp.returns
            if old is None:
                old = values.detach()
                returns = returns_of(exp, old)
            loss, stats = rl_math.value_loss(values, old, returns, exp.action_mask, cfg.value_clip, cfg.loss_agg, norm)
            stats["value_loss"] = loss.detach()
            return loss, stats

        return values, loss_fn

    return step


# ---- rollout log-probs and PPO-ptx -------------------------------------------------------------------

def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def ptx_batches(path: str, tokenizer, seed: int):
    """PPO-ptx's SFT rows (tokenised before anything starts); called with the state, an endless
    stream of this DP rank's micro-batches."""
    from engine.data import batches, pack_documents, read_jsonl, tokenize_documents
    docs = tokenize_documents(read_jsonl(path), tokenizer, "sft", 64)
    data = pack_documents(docs, 64, tokenizer.pad_id)

    def stream(state):  # 8 rows a step over all DP ranks, so any DP size mixes in the same rows
        for micro in batches(data, max(1, 8 // state.dp), 1, seed, state.dp_rank, state.dp):
            yield micro[0]
    return stream


def ptx_forward_step(coef: float):
    """The SFT loss (engine/train.py's) weighted by coef, normalised by the micro-batch's tokens over
    every DP rank."""
    from engine.data import IGNORE
    from engine.train import lm_forward_step
    from parallel import comm

    def step(model, mb):
        num_tokens = (mb["labels"] != IGNORE).sum().double()
        comm.all_reduce(num_tokens, model.state.dp_group)
        logits, loss_fn = lm_forward_step(model, {**mb, "num_tokens": num_tokens.clamp(min=1.0) / coef})
        return logits, loss_fn
    return step
