"""RMSNorm: y = x / rms(x) * w, computed in fp32 like HF Llama, returned in the input dtype."""
from __future__ import annotations

import torch
from torch import nn

from kernels.apex import nvidia_apex


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class _RMSNorm(torch.autograd.Function):
    """The reference's math with hand-derived backward: few passes, saves only x and rstd [.., 1].

    n = x * rstd, rstd = (mean(x^2) + eps)^-1/2, y = w * n (n rounded to x's dtype first, as HF does)
    dn = (g * w) ; dx = rstd * (dn - n * mean(dn * n)) ; dw = sum over tokens of g * n
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True).add_(eps))
        if x.dtype == torch.float32:
            y = xf * rstd
        else:
            y = torch.empty_like(x)
            torch.mul(xf, rstd, out=y)  # rounds n to x's dtype once
        y.mul_(weight)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        n = x * rstd if x.dtype == torch.float32 else x.float().mul_(rstd)  # never in place on x
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * n).flatten(0, -2).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = (g * weight).float()
            dot = (dn * n).mean(-1, keepdim=True)
            dn.addcmul_(n, dot, value=-1.0)
            if x.dtype == torch.float32:
                dx = dn.mul_(rstd)
            else:
                dx = torch.empty_like(x)
                torch.mul(dn, rstd, out=dx)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatch: NVIDIA apex's fused RMSNorm on CUDA where it imports; the hand-written autograd kernel
    (same math as the reference) when dtypes agree."""
    if x.is_cuda and weight.dtype == x.dtype and nvidia_apex() is not None:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
        return fused_rms_norm_affine(x, weight, (x.shape[-1],), eps)
    if weight.dtype != x.dtype or x.dim() < 2 or torch.compiler.is_compiling():
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
        return rms_norm_reference(x, weight, eps)  # under torch.compile inductor fuses this by itself
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
