"""bf16 / fp16 linear layers on CPUs without native low-precision GEMMs.

torch's CPU GEMM for bf16 and fp16 runs at full speed only with AVX512-BF16 / AVX512-FP16 or AMX. On
other CPUs (e.g. AVX2-only AMD EPYC Zen 2, measured 2026-12-02: a [1024, 128] x [128, 704] bf16 linear
26 ms against 2.4 ms in fp32) it falls back to a slow kernel. There the GEMM is done in fp32 on the
upcast operands and the result rounded to the input dtype: what a native bf16 GEMM computes (fp32
accumulation, one rounding of the output), at fp32 speed. Forward and both gradients; activations and
weights stay in the low-precision dtype (saved for backward as they are).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_low_precision_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (unknown CPUs: assume so)."""
    flags = _cpu_flags()
    return not flags or any(f in flags for f in _FLAGS.get(dtype, ()))


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gf = g.float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (gf @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (gf.reshape(-1, gf.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gf.reshape(-1, gf.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with low-precision CPU GEMMs done in fp32 where the CPU has no native kernel."""
    if (x.device.type == "cpu" and x.dtype in _FLAGS and weight.dtype == x.dtype
            and not native_low_precision_gemm(x.dtype) and not torch.compiler.is_compiling()):
        return _UpcastLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
