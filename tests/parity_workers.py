"""Rank functions for the tensor-parallel parity tests (spawned by tests/distributed.py)."""
from __future__ import annotations

import torch

from engine.checkpoint import HFSource, load_into
from engine.model import Transformer
from parallel import comm
from parallel.grads import finalize_tp_grads
from parallel.layers import vocab_parallel_cross_entropy
from parallel.state import build_state


def full_logits(local: torch.Tensor, model: Transformer) -> torch.Tensor:
    """Gather vocab slices of unequal width (the last rank holds no padding) into full logits."""
    group = model.state.tp_group
    per_rank = model.embed.per_rank if model.first else None
    per_rank = per_rank or local.shape[-1]
    padded = torch.nn.functional.pad(local, (0, per_rank - local.shape[-1]))
    return comm.all_gather(padded.contiguous(), group, dim=-1)[..., : model.cfg.vocab_size]


def logits_at_tp(rank, world, hf_dir, ids, tps, sp):
    out = {}
    for tp in tps:
        state = build_state(rank, tp, 1, world // tp, torch.device("cpu"))
        src = HFSource(hf_dir)
        model = Transformer(src.config, state, sequence_parallel=sp)
        load_into(model, src)
        with torch.no_grad():
            out[tp] = full_logits(model(ids), model)
    return out


def grads_at_tp(rank, world, hf_dir, ids, labels, tp, sp, select=None):
    """Loss and per-canonical-tensor gradient slices on this rank: {name: (dim, start, length, grad)}.
    With `select` the loss covers the logits at those positions only."""
    state = build_state(rank, tp, 1, world // tp, torch.device("cpu"))
    src = HFSource(hf_dir)
    model = Transformer(src.config, state, sequence_parallel=sp)
    load_into(model, src)
    if select is not None:
        labels = labels.gather(1, select)
    logits = model(ids, select=select)
    loss = vocab_parallel_cross_entropy(logits, labels, state.tp_group, model.vocab_start).mean()
    loss.backward()
    finalize_tp_grads(model.parameters())
    params = dict(model.named_parameters())
    grads = {}
    for s in model.shard_specs():
        g = params[s.param].grad
        if s.rows is not None:
            g = g[s.rows[0]:s.rows[1]]
        grads[s.name] = (s.dim, s.start, s.length, g.clone())
    return loss.item(), grads


def values_at_tp2_sp(rank, world, hf_dir, ids, select=None):
    state = build_state(rank, 2, 1, world // 2, torch.device("cpu"))
    src = HFSource(hf_dir)
    model = Transformer(src.config, state, sequence_parallel=True)
    load_into(model, src)
    with torch.no_grad():
        return model(ids), model(ids, select=select)
