"""The engine's own batched sampler: KV cache, temperature / top-k / top-p, stop at EOS, any TP.

Every TP rank computes the same full last-position logits (vocab slices are all-gathered, which is
cheap for one position) and draws with the same seeded generator, so all ranks pick the same tokens.
Prompts are left-padded so that every row's next token sits in the same column.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from parallel import comm


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    max_new_tokens: int = 32
    """Longest response."""
    stop_at_eos: bool = True
    """End a response at the EOS token (which is kept as its last token)."""
    seed: int = 0
    """Seeds the draws (identical on every TP rank)."""


class _LayerCache:
    def __init__(self, cache: "KVCache", index: int):
        self.cache, self.index = cache, index

    def append(self, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        if c.k[self.index] is None:
            shape = (k.shape[0], k.shape[1], c.max_len, k.shape[3])
            c.k[self.index] = k.new_zeros(shape)
            c.v[self.index] = v.new_zeros(shape)
        end = c.length + k.shape[2]
        c.k[self.index][:, :, c.length:end] = k
        c.v[self.index][:, :, c.length:end] = v
        return c.k[self.index][:, :, :end], c.v[self.index][:, :, :end]


class KVCache:
    """Preallocated keys/values per layer, [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def advance(self, n: int) -> None:
        self.length += n


def gather_vocab(local: torch.Tensor, model) -> torch.Tensor:
    """Full logits from this rank's unpadded vocab slice (the last rank's slice may be shorter)."""
    if model.state.tp == 1:
        return local
    per_rank = -(-model.cfg.vocab_size // model.state.tp)
    padded = torch.nn.functional.pad(local, (0, per_rank - local.shape[-1]))
    return comm.all_gather(padded.contiguous(), model.state.tp_group, -1)[..., : model.cfg.vocab_size]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (logits already divided by temperature)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """(token ids [b], log-prob of each under softmax(logits / T) [b]) from full logits [b, V].

    The log-prob is of the temperature-scaled, unfiltered distribution: what the trainer recomputes.
    """
    logits = logits.float()
    if params.temperature <= 0:
        tokens = logits.argmax(-1)
        logp = logits.log_softmax(-1)
    else:
        scaled = logits / params.temperature
        logp = scaled.log_softmax(-1)
        probs = filter_logits(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@contextmanager
def inference_mode(model):
    """No grad, eval mode, and sequence parallelism off (decoding one token cannot be split)."""
    flagged = [m for m in model.modules() if getattr(m, "sequence_parallel", False)]
    was_sp, was_training = model.sp, model.training
    for m in flagged:
        m.sequence_parallel = False
    model.sp = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in flagged:
            m.sequence_parallel = True
        model.sp = was_sp
        model.train(was_training)


def generate(model, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int):
    """Returns (responses: list of token lists, logprobs: list of float lists), EOS included."""
    b = len(prompts)
    device = model.state.device
    plen = max(len(p) for p in prompts)
    ids = torch.full((b, plen), pad_id, dtype=torch.long)
    real = torch.zeros(b, plen + params.max_new_tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, plen - len(p):] = torch.tensor(p)
        real[i, plen - len(p):] = True
    real[:, plen:] = True
    ids, real = ids.to(device), real.to(device)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = KVCache(len(model.layers), plen + params.max_new_tokens)
    out_tokens, out_logps = [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    with inference_mode(model):
        causal = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
        eye = torch.eye(plen, dtype=torch.bool, device=device)
        # pad queries see only themselves (no NaN rows); real queries skip pad keys
        mask = (causal & real[:, None, None, :plen]) | eye
        step_ids, step_pos = ids, positions[:, :plen]
        for t in range(params.max_new_tokens):
            local = model(step_ids, step_pos, mask, kv_cache=cache)[:, -1]
            tokens, logps = sample_next(gather_vocab(local, model), params, generator)
            tokens = tokens.masked_fill(done, pad_id)
            out_tokens.append(tokens)
            out_logps.append(logps)
            if params.stop_at_eos:
                done |= tokens == eos_id
            if done.all():
                break
            cur = plen + t + 1
            step_ids, step_pos = tokens[:, None], positions[:, cur - 1:cur]
            mask = real[:, None, None, :cur]
    tokens = torch.stack(out_tokens, 1).tolist()
    logps = torch.stack(out_logps, 1).tolist()
    responses, logprobs = [], []
    for row_t, row_l in zip(tokens, logps):
        n = row_t.index(eos_id) + 1 if params.stop_at_eos and eos_id in row_t else len(row_t)
        responses.append(row_t[:n])
        logprobs.append(row_l[:n])
    return responses, logprobs
