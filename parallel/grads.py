"""Gradient finalisation and the global gradient norm over a model split across TP (and PP) ranks.

Everything stays on the gradients' device: the norm is a 0-dim float64 tensor, clipping multiplies by
a device scalar, and nothing here synchronises with the host.
"""
from __future__ import annotations

import torch

from parallel import comm


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient: the fp32 `main_grad` buffer view (parallel/ddp.py) when it has one, else .grad."""
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def finalize_tp_grads(params) -> None:
    """All-reduce the gradients that are only partial on each rank of a replica group (see
    layers.Replica: SP norms, shared KV heads, a tied embedding split across pipeline stages)."""
    for p in params:
        rep = getattr(p, "replica", None)
        g = grad_of(p)
        if g is not None and rep is not None and rep.grads_partial:
            comm.all_reduce(g[rep.row_start:], rep.group)


def grad_sq_sum(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of the given gradient tensors (views), float64 on `device`."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(grads, 2)).double().square().sum()


def owned_grad_views(pieces) -> list[torch.Tensor]:
    """The gradient entries this rank counts in the global norm, for (parameter, lo, hi) flat
    ranges it steps: replica rows [row_start:] only on the replica's owner."""
    out = []
    for p, lo, hi in pieces:
        rep = getattr(p, "replica", None)
        if rep is not None and not rep.is_owner:
            hi = min(hi, rep.row_start * (p.numel() // max(1, p.shape[0])))
        if lo < hi:
            out.append(grad_of(p).view(-1)[lo:hi])
    return out


def scale_grads(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply gradient tensors by a device scalar (unscaling and clipping in one pass)."""
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings the global norm down to max_norm (1 when it is below, or not finite)."""
    one = torch.ones_like(norm)
    if max_norm <= 0:
        return one
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), factor, one)
