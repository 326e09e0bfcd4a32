"""Gradient finalisation and the global gradient norm over a model split across TP (and PP) ranks."""
from __future__ import annotations

import math

import torch

from parallel import comm


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient: the fp32 `main_grad` under data parallelism (parallel/ddp.py), else .grad."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def finalize_tp_grads(params) -> None:
    """All-reduce the gradients that are only partial on each rank of a replica group (see
    layers.Replica: SP norms, shared KV heads, a tied embedding split across pipeline stages)."""
    for p in params:
        rep = getattr(p, "replica", None)
        g = grad_of(p)
        if g is not None and rep is not None and rep.grads_partial:
            comm.all_reduce(g[rep.row_start:], rep.group)


def local_grad_sq_sum(params) -> torch.Tensor:
    """Sum of squared gradient entries this rank is responsible for (replicas counted once)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        g = grad_of(p)
        if g is None:
            continue
        rep = getattr(p, "replica", None)
        if rep is not None and not rep.is_owner:
            g = g[:rep.row_start]
        total += g.double().square().sum() if g.numel() else 0.0
    return total


def global_grad_norm(params, groups) -> float:
    """L2 norm of the full model's gradient; `groups` are those across which the model is split."""
    sq = local_grad_sq_sum(params)
    for g in groups:
        comm.all_reduce(sq, g)
    return math.sqrt(sq.item())


def clip_grads(params, max_norm: float, groups) -> float:
    """Scale gradients so the global norm is at most max_norm; returns the norm before clipping."""
    params = [p for p in params if grad_of(p) is not None]
    norm = global_grad_norm(params, groups)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            grad_of(p).mul_(scale)
    return norm
