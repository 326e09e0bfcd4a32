"""kernels/attention.py: the blocked Python kernel and the fused C++ kernel against float64 attention,
held to the accuracy of torch's own kernel at the same dtype (forward and all three gradients)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import attention
from kernels.attention import (attention_at_positions, causal_attention, fused_causal_attention,
                               scaled_dot_product_attention)

HAS_BF16_ISA = {"avx512_bf16", "avx512bw"} <= attention._cpu_flags()


def _inputs(b, h, s, d, dt):
    # q, k, v as the model makes them: [b, h, s, d] views of [b, s, h, d] memory, exactly representable in dt
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64).mul(2).to(dt).double().transpose(1, 2) for _ in range(3))
    return q, k, v, torch.randn(b, h, s, d).to(dt).double()


def _run(f, q, k, v, g, cast):
    xs = [t.to(cast).detach().requires_grad_() for t in (q, k, v)]
    out = f(*xs)
    out.backward(g.to(cast))
    return [out.double()] + [t.grad.double() for t in xs]


def _assert_as_accurate_as_torch(kernel, dt, shape):
    q, k, v, g = _inputs(*shape, dt)
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    exact = _run(sdpa, q, k, v, g, torch.float64)
    torch_kernel, mine = _run(sdpa, q, k, v, g, dt), _run(kernel, q, k, v, g, dt)
    for name, e, t, m in zip(("out", "dq", "dk", "dv"), exact, torch_kernel, mine):
        err_torch, err_mine = (t - e).abs().max(), (m - e).abs().max()
        assert err_mine <= 2 * err_torch + 1e-6 * e.abs().max(), (name, err_mine.item(), err_torch.item())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_kernel_matches_sdpa(dtype):
    _assert_as_accurate_as_torch(causal_attention, getattr(torch, dtype), (2, 3, 300, 16))


@pytest.mark.skipif(not HAS_BF16_ISA, reason="the fused kernel needs AVX512-BF16")
@pytest.mark.parametrize("shape", [(2, 3, 300, 16), (3, 2, 129, 64), (1, 2, 5, 32), (1, 1, 1, 16), (1, 2, 70, 128)])
def test_fused_kernel_matches_sdpa(shape):
    # s across block (64) and tile (16) edges, odd s (a zero-padded key pair), d from 16 to 128
    assert attention.native_kernel_available()  # this CPU can run it: a failed build is a failure here
    _assert_as_accurate_as_torch(fused_causal_attention, torch.bfloat16, shape)


@pytest.mark.skipif(not HAS_BF16_ISA, reason="the fused kernel needs AVX512-BF16")
@pytest.mark.parametrize("rows", ["suffix", "scattered", "unsorted", "last"])
def test_fused_kernel_at_chosen_query_positions(rows):
    # a last layer whose outputs are read at some positions only: response tokens (a suffix), any
    # subset per sequence, or the last token (reward model); keys past the last query get no gradient
    b, h, s, d = 3, 2, 150, 32
    q, k, v, _ = _inputs(b, h, s, d, torch.bfloat16)
    if rows == "suffix":
        pos = torch.arange(40, 149).expand(b, -1)
    elif rows == "scattered":
        pos = torch.stack([torch.randperm(140)[:70].sort().values for _ in range(b)])
    elif rows == "unsorted":  # with repeats
        pos = torch.randint(0, 140, (b, 70))
    else:
        pos = torch.tensor([[149], [100], [0]])
    q = q.gather(2, pos[:, None, :, None].expand(-1, h, -1, d))
    g = torch.randn(q.shape).bfloat16().double()
    masked = lambda a, b_, c: F.scaled_dot_product_attention(  # noqa: E731
        a, b_, c, attn_mask=pos[:, None, :, None] >= torch.arange(s))
    exact = _run(masked, q, k, v, g, torch.float64)
    torch_kernel = _run(masked, q, k, v, g, torch.bfloat16)
    mine = _run(lambda a, b_, c: fused_causal_attention(a, b_, c, q_pos=pos), q, k, v, g, torch.bfloat16)
    for name, e, t, m in zip(("out", "dq", "dk", "dv"), exact, torch_kernel, mine):
        assert (m - e).abs().max() <= 2 * (t - e).abs().max() + 1e-6 * e.abs().max(), name
    unseen = torch.arange(s) > pos.max(1).values[:, None]  # [b, s]
    assert unseen.any() and (mine[2].abs().sum(-1).transpose(0, 1)[:, unseen] == 0).all()
    # the entry point the model calls routes here, and its masked-SDPA fallback (fp32) agrees
    assert torch.equal(attention_at_positions(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos),
                       fused_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos=pos))
    ref = attention_at_positions(q.float(), k.float(), v.float(), pos)
    assert (ref.double() - exact[0]).abs().max() < 1e-4


@pytest.mark.skipif(not HAS_BF16_ISA, reason="the fused kernel needs AVX512-BF16")
def test_drop_in_routes_bf16_to_fused_kernel_with_and_without_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "fused_causal_attention",
                        lambda *a: calls.append(1) or fused_causal_attention(*a))
    q, k, v, _ = _inputs(2, 4, 40, 32, torch.bfloat16)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():  # reference / reward scoring: forward only
        out = scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert calls and (out.double() - ref).abs().max() < 0.05
    # GQA: two query heads per KV head, repeated before the kernel; gradients sum back to the KV heads
    kv = [t[:, :2].detach().requires_grad_() for t in (k, v)]
    out = scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
    out.float().pow(2).sum().backward()
    ref_kv = [t.detach().double().requires_grad_() for t in kv]
    F.scaled_dot_product_attention(q.double(), *ref_kv, is_causal=True, enable_gqa=True).pow(2).sum().backward()
    assert len(calls) == 2
    for mine, exact in zip(kv, ref_kv):
        assert (mine.grad.double() - exact.grad).abs().max() < 0.05 * exact.grad.abs().max()


def test_drop_in_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(attention, "native_low_precision_gemm", lambda dtype: True)  # routing on a bf16 CPU
    q, k, v, _ = _inputs(2, 3, 300, 16, torch.bfloat16)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    mask = torch.ones(300, 300, dtype=torch.bool).tril()
    a = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # what the fused kernel does not handle goes to torch as is: a negative scale (torch's CPU kernel
    # itself returns NaN rows there), v with another head dim
    for args, kw in [((q, k, v), {"scale": -0.25}), ((q, k, torch.cat([v, v], -1)), {})]:
        with torch.no_grad():
            mine = scaled_dot_product_attention(*args, is_causal=True, **kw)
            assert torch.allclose(mine, F.scaled_dot_product_attention(*args, is_causal=True, **kw),
                                  rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not HAS_BF16_ISA, reason="the fused kernel needs AVX512-BF16")
def test_bf16_model_last_layer_runs_selected_rows_through_fused_kernel(monkeypatch):
    from engine.checkpoint import RandomSource, load_into
    from engine.config import ModelConfig
    from engine.model import Transformer
    from parallel.state import ParallelState

    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64)
    model = Transformer(cfg, ParallelState(), dtype=torch.bfloat16)
    load_into(model, RandomSource(cfg, 0))
    ids, select = torch.randint(0, 96, (3, 40)), torch.arange(20, 39).expand(3, -1)
    positions = []
    monkeypatch.setattr(attention, "fused_causal_attention",
                        lambda *a, q_pos=None: positions.append(q_pos) or fused_causal_attention(*a, q_pos=q_pos))
    picked = model(ids, select=select)
    assert positions[-1] is select and positions[0] is None  # last layer: chosen rows; first: every row
    full = model(ids).gather(1, select[..., None].expand(-1, -1, 96))
    assert (picked.float() - full.float()).abs().max() <= 0.02 * full.float().abs().max()


def test_without_the_fused_kernel_bf16_takes_the_blocked_kernel(monkeypatch):
    # TRIDENT_CPU_KERNELS=0 or a failed build on a CPU with bf16 GEMMs: training still gets the blocked kernel
    monkeypatch.setattr(attention, "native_low_precision_gemm", lambda dtype: True)
    monkeypatch.setenv("TRIDENT_CPU_KERNELS", "0")
    assert attention._load_native() is False
    monkeypatch.setattr(attention, "_native_ok", False)
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or causal_attention(*a))
    q, k, v, _ = _inputs(1, 2, 160, 16, torch.bfloat16)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls and torch.equal(out, causal_attention(q, k, v))
    with torch.no_grad():  # scoring: torch's kernel
        assert torch.equal(scaled_dot_product_attention(q, k, v, is_causal=True),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert len(calls) == 1
