"""Rank functions for tests/test_layers.py (spawned by tests/distributed.py).

Every function returns its results as bytes (torch.save): tensors handed to a multiprocessing queue
as they are travel by file descriptor, which the parent can only open while the sending rank still
runs, and a rank exits right after returning.
"""
from __future__ import annotations

import io
import os
from unittest import mock

import torch

from parallel import comm
from parallel.grads import finalize_tp_grads
from parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                             vocab_parallel_cross_entropy, vocab_parallel_entropy,
                             vocab_parallel_log_probs, vocab_parallel_log_probs_and_entropy)
from parallel.state import build_state

CPU = torch.device("cpu")


def pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def chunk(t: torch.Tensor, n: int, i: int, dim: int) -> torch.Tensor:
    return t.chunk(n, dim=dim)[i].contiguous()


# ---- vocab-parallel losses ---------------------------------------------------------------------

def vocab_losses_local(local: torch.Tensor, target, weight, group, vocab_start) -> dict:
    """Per-token outputs of the three losses on this rank's logits slice, and d(sum w*out)/d local."""
    out = {}
    for name, fn in (("ce", lambda z: vocab_parallel_cross_entropy(z, target, group, vocab_start)),
                     ("lp", lambda z: vocab_parallel_log_probs(z, target, group, vocab_start)),
                     ("ent", lambda z: vocab_parallel_entropy(z, group)),
                     ("lp_ent_t", lambda z: _lp_plus_half_entropy(z, target, group, vocab_start))):
        z = local.detach().clone().requires_grad_()
        y = fn(z)
        (g,) = torch.autograd.grad((weight * y).sum(), z)
        out[name] = y.detach()
        out["g_" + name] = g
    return out


def _lp_plus_half_entropy(z, target, group, vocab_start):
    """Both outputs of the fused function at temperature 0.7, so backward gets both gradients."""
    logp, entropy = vocab_parallel_log_probs_and_entropy(z, target, group, vocab_start, temperature=0.7)
    return logp + 0.5 * entropy


def vocab_losses(rank, world, cases, tps):
    """cases: {name: (logits [dp, B, S, V] fp32, target [dp, B, S], weight [dp, B, S], pass_start)}.

    Each DP replica of the grid gets its own logits so a collective on the wrong group shows.
    Returns {(tp, case, dtype): {...}} with this rank's slice bounds and results.
    """
    results = {}
    for tp in tps:
        state = build_state(rank, tp, 1, world // tp, CPU)
        for name, (logits, target, weight, pass_start) in cases.items():
            d = state.dp_rank % logits.shape[0]
            V = logits.shape[-1]
            per_rank = -(-V // tp)
            start = state.tp_rank * per_rank
            stop = min(start + per_rank, V)
            for dtype in (torch.float32, torch.bfloat16):
                local = logits[d, ..., start:stop].to(dtype)
                res = vocab_losses_local(local, target[d], weight[d], state.tp_group,
                                         start if pass_start else None)
                res.update(dp=d, start=start, stop=stop)
                results[(tp, name, str(dtype))] = res
    return pack(results)


# ---- region ops, SP layers, megatron oracle at TP=2 ----------------------------------------------

REGION_OPS = {
    "copy_to_tp": comm.copy_to_tensor_model_parallel_region,
    "reduce_from_tp": comm.reduce_from_tensor_model_parallel_region,
    "scatter_to_tp": comm.scatter_to_tensor_model_parallel_region,
    "gather_from_tp": comm.gather_from_tensor_model_parallel_region,
    "gather_from_sp": lambda x, g: comm.gather_from_sequence_parallel_region(x, g, True),
    "gather_from_sp_no_tp_grad": lambda x, g: comm.gather_from_sequence_parallel_region(x, g, False),
    "reduce_scatter_to_sp": comm.reduce_scatter_to_sequence_parallel_region,
    "scatter_to_sp": comm.scatter_to_sequence_parallel_region,
}


def region_ops(rank, group, xs) -> dict:
    """xs: [tp, B, S, H], rank r feeds xs[r]. Returns {op: (y, upstream grad, dx, input untouched)}."""
    out = {}
    for i, (name, op) in enumerate(REGION_OPS.items()):
        x0 = xs[rank].clone()
        x = x0.clone().requires_grad_()
        y = op(x, group)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 * i + rank))
        (dx,) = torch.autograd.grad(y, x, g)
        out[name] = (y.detach().clone(), g, dx, torch.equal(x.detach(), x0))
    return out


def _grads(module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def sp_layers(rank, group, tp, d) -> dict:
    """Column/Row/Embedding with sequence_parallel=True; d holds the full tensors (see the test)."""
    out = {}
    X, W, b, G = d["col_x"], d["col_w"], d["col_b"], d["col_g"]
    col = ColumnParallelLinear(X.shape[-1], W.shape[0], group, bias=True, sequence_parallel=True)
    with torch.no_grad():
        col.weight.copy_(chunk(W, tp, rank, 0))
        col.bias.copy_(chunk(b, tp, rank, 0))
    x = chunk(X, tp, rank, 1).requires_grad_()
    y = col(x)
    y.backward(chunk(G, tp, rank, -1))
    finalize_tp_grads(col.parameters())
    out["column"] = dict(y=y.detach(), dx=x.grad, **_grads(col))

    X, W, b, G = d["row_x"], d["row_w"], d["row_b"], d["row_g"]
    row = RowParallelLinear(W.shape[1], W.shape[0], group, bias=True, sequence_parallel=True)
    with torch.no_grad():
        row.weight.copy_(chunk(W, tp, rank, 1))
        row.bias.copy_(b)
    x = chunk(X, tp, rank, -1).requires_grad_()
    y = row(x)
    y.backward(chunk(G, tp, rank, 1))
    bias_partial = row.bias.grad.clone()
    finalize_tp_grads(row.parameters())
    out["row"] = dict(y=y.detach(), dx=x.grad, bias_partial=bias_partial,
                      grads_partial=row.bias.replica.grads_partial, **_grads(row))

    ids, W, G = d["emb_ids"], d["emb_w"], d["emb_g"]
    for sp in (True, False):
        emb = VocabParallelEmbedding(W.shape[0], W.shape[1], group, sequence_parallel=sp)
        padded = torch.cat([W, W.new_zeros(emb.per_rank * tp - W.shape[0], W.shape[1])])
        with torch.no_grad():
            emb.weight.copy_(chunk(padded, tp, rank, 0))
        y = emb(ids)
        y.backward(chunk(G, tp, rank, 1) if sp else G)
        finalize_tp_grads(emb.parameters())
        out[f"embedding_sp={sp}"] = dict(y=y.detach(), per_rank=emb.per_rank, start=emb.vocab_start,
                                         **_grads(emb))
    return out


def megatron_vs_ours(rank, group, tp, d) -> dict:
    with mock.patch.object(torch.cuda, "current_device", return_value="cpu"):
        return _megatron_vs_ours(rank, group, tp, d)


def _megatron_vs_ours(rank, group, tp, d) -> dict:
    """Megatron-core's Column/RowParallelLinear next to ours, same shards, same inputs (no SP).

    On CPU/gloo megatron needs: use_cpu_initialization=True (else weights go to cuda), and
    gradient_accumulation_fusion=False (its default; True needs the apex CUDA extension). Its async
    dgrad all-reduce (allreduce_dgrad) runs on gloo as is; CUDA_DEVICE_MAX_CONNECTIONS only silences
    a performance warning. Its last-dim all-gather (gather_output=True forward, input_is_parallel=False
    backward) allocates its buffer on torch.cuda.current_device() (mappings._gather_along_last_dim),
    so current_device is patched to answer "cpu" here (a throwaway spawned rank; ours never calls it).
    """
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig

    mps.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              perform_initialization=False, sequence_parallel=False,
                              gradient_accumulation_fusion=False, params_dtype=torch.float32)
    no_init = lambda w: None  # noqa: E731 - perform_initialization=False never calls it
    sbh = lambda t: t.transpose(0, 1)  # noqa: E731 - ours [b, s, h] <-> megatron [s, b, h]
    out = {}
    try:
        X, W, b, G = d["col_x"], d["col_w"], d["col_b"], d["col_g"]
        for gather in (False, True):
            theirs = mtp.ColumnParallelLinear(X.shape[-1], W.shape[0], config=cfg, init_method=no_init,
                                              bias=True, gather_output=gather)
            ours = ColumnParallelLinear(X.shape[-1], W.shape[0], group, bias=True, gather_output=gather)
            for layer in (theirs, ours):
                with torch.no_grad():
                    layer.weight.copy_(chunk(W, tp, rank, 0))
                    layer.bias.copy_(chunk(b, tp, rank, 0))
            g = G if gather else chunk(G, tp, rank, -1)
            xo, xt = X.clone().requires_grad_(), sbh(X).clone().requires_grad_()
            yo = ours(xo)
            yt, bias_out = theirs(xt)
            yo.backward(g)
            yt.backward(sbh(g))
            out[f"column_gather={gather}"] = dict(
                ours=dict(y=yo.detach(), dx=xo.grad, **_grads(ours)),
                theirs=dict(y=sbh(yt.detach()), dx=sbh(xt.grad), **_grads(theirs)),
                bias_out=bias_out)

        X, W, b, G = d["row_x"], d["row_w"], d["row_b"], d["row_g"]
        for parallel_in in (True, False):
            theirs = mtp.RowParallelLinear(W.shape[1], W.shape[0], config=cfg, init_method=no_init,
                                           bias=True, input_is_parallel=parallel_in, skip_bias_add=False)
            ours = RowParallelLinear(W.shape[1], W.shape[0], group, bias=True, input_is_parallel=parallel_in)
            for layer in (theirs, ours):
                with torch.no_grad():
                    layer.weight.copy_(chunk(W, tp, rank, 1))
                    layer.bias.copy_(b)
            x = chunk(X, tp, rank, -1) if parallel_in else X
            xo, xt = x.clone().requires_grad_(), sbh(x).clone().requires_grad_()
            yo = ours(xo)
            yt, bias_out = theirs(xt)
            yo.backward(G)
            yt.backward(sbh(G))
            finalize_tp_grads(ours.parameters())
            out[f"row_parallel_input={parallel_in}"] = dict(
                ours=dict(y=yo.detach(), dx=xo.grad, **_grads(ours)),
                theirs=dict(y=sbh(yt.detach()), dx=sbh(xt.grad), **_grads(theirs)),
                bias_out=bias_out)
    finally:
        mps.destroy_model_parallel()
    return out


def tp2_checks(rank, world, xs, d):
    """One 2-rank spawn: region ops, sequence-parallel layers, megatron-core oracle."""
    state = build_state(rank, world, 1, 1, CPU)
    return pack(dict(region=region_ops(rank, state.tp_group, xs),
                     sp=sp_layers(rank, state.tp_group, world, d),
                     megatron=megatron_vs_ours(rank, state.tp_group, world, d)))
