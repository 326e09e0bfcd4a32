"""SwiGLU activation on a fused [gate | up] projection: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """Same math as the reference; the backward writes both halves of the gradient in place (no cat)
    and uses aten's fused silu_backward."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, g):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        d_gate, d_up = grad.chunk(2, dim=-1)
        torch.mul(g, act, out=d_up)
        torch.mul(g, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        return grad


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.shape[-1] % 2 or torch.compiler.is_compiling():
        return swiglu_reference(gate_up)  # inductor fuses the reference by itself
    return _SwiGLU.apply(gate_up)
