"""Gradient finalisation and the global gradient norm over a model split across TP (and PP) ranks."""
from __future__ import annotations

import math

import torch

from parallel import comm


def finalize_tp_grads(params) -> None:
    """All-reduce the gradients that are only partial on each TP rank (see layers.Replica)."""
    for p in params:
        rep = getattr(p, "replica", None)
        if p.grad is not None and rep is not None and rep.grads_partial:
            comm.all_reduce(p.grad[rep.row_start:], rep.group)


def local_grad_sq_sum(params) -> torch.Tensor:
    """Sum of squared gradient entries this rank is responsible for (replicas counted once)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
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
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, groups)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm
