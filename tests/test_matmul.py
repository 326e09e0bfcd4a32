"""bf16 / fp16 GEMMs and attention on CPUs without native low-precision GEMMs are computed in fp32 on the
upcast operands and rounded: forward and gradients equal that reference exactly, and the routing takes
the native kernels where the CPU has them."""
import pytest
import torch
import torch.nn.functional as F

import kernels.attention as attention
import kernels.matmul as matmul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_linear_equals_fp32_math_rounded(monkeypatch, dtype):
    monkeypatch.setattr(matmul, "native_low_precision_gemm", lambda d: False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 32, generator=g).to(dtype).requires_grad_()
    w = torch.randn(24, 32, generator=g).to(dtype).requires_grad_()
    b = torch.randn(24, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(3, 5, 24, generator=g).to(dtype)
    y = matmul.linear(x, w, b)
    y.backward(gy)
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    ref = F.linear(xf, wf, bf)
    ref.backward(gy.float())
    assert y.dtype == dtype and torch.equal(y, ref.to(dtype))
    for mine, theirs in ((x, xf), (w, wf), (b, bf)):
        assert mine.grad.dtype == dtype and torch.equal(mine.grad, theirs.grad.to(dtype))


def test_routing_follows_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(matmul._UpcastLinear, "apply", lambda *a: calls.append(1) or F.linear(*a))
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(6, 8).bfloat16()
    monkeypatch.setattr(matmul, "native_low_precision_gemm", lambda d: True)
    matmul.linear(x, w)
    matmul.linear(x.float(), w.float())
    assert calls == []
    monkeypatch.setattr(matmul, "native_low_precision_gemm", lambda d: False)
    matmul.linear(x, w)
    assert calls == [1]


def test_attention_without_native_bf16_runs_in_fp32(monkeypatch):
    monkeypatch.setattr(attention, "native_low_precision_gemm", lambda d: False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    out = attention.scaled_dot_product_attention(q, k, v, is_causal=True)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    gy = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(gy)
    ref.backward(gy.float())
    assert torch.equal(q.grad, qf.grad.bfloat16()) and torch.equal(v.grad, vf.grad.bfloat16())
