"""Causal self-attention for CPU training, faster than torch's CPU flash kernel at training shapes.

Measured on the 2-core AVX512-bf16 box (b=4, h=16, s=512, d=64), torch 2.13's CPU flash attention
does its causal work at ~15 GFLOP/s, while the same cores run batched matmuls at 70-130 GFLOP/s (fp32)
and 500-600 GFLOP/s (bf16). This kernel splits the queries into row blocks of 64 so fully masked key
blocks are skipped (36/64 of the square is computed at s=512), and does every product as a batched
matmul:

  S = Q K^T and dP = dO V^T to ~fp32 precision (fp32 inputs: fp32 matmul; bf16 inputs: a bf16 matmul
  plus a second one for its rounding residual, see _scores), softmax in fp32; P V, P^T dO, dS K and
  dS^T Q in the input dtype (P and dS rounded to bf16, as torch's flash kernel does); dK and dV
  accumulate over row blocks in fp32.

The softmax probabilities of each row block are kept (input dtype, [b*h, rows, keys so far]) rather
than recomputed in backward: one score computation less per block for 2 bytes per unmasked score. The
output is laid out [b, s, h, d] in memory, so the caller's transpose(1, 2).reshape is a view.

bf16 on CPUs with AVX512-BF16 goes to the fused C++ kernel in csrc/attention_cpu.cpp instead (built
on first use with torch's cpp_extension, ~10 s, cached): one head at a time in cache, no copies,
S and dP at fp32 accuracy from vdpbf16ps, P recomputed in backward from the log-sum-exp. At PPO L's
shape (b=64, h=8, s=192, d=64) forward + backward take 27 ms against 115 ms for the blocked kernel
and forward alone 9 ms against 38 ms for torch's SDPA. Set TRIDENT_CPU_KERNELS=0 to turn it off; a
failed build warns once and falls back.

`scaled_dot_product_attention` has the signature of torch's and falls back to it whenever the fast
path does not apply (explicit masks, dropout, non-CPU tensors; for fp32 also no grad needed or short
sequences). Both kernels are torch.library custom ops (forward and backward), so torch.compile keeps
each as one call.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.matmul import native_low_precision_gemm

BLOCK = 64
"""Query rows per block (measured best at s=512: 64 beats 32, 96, 128)."""
MIN_SEQ = 128
"""Shorter sequences go to torch's kernel (blocking gains nothing there). At s = 192 (PPO L: 64 + 128
tokens, b = 64, 8 heads) the kernel saves ~0.5 s of an 8 s actor + critic update (A/B in one process)."""


def _blocks(s: int, block: int) -> list[tuple[int, int]]:
    n = max(1, round(s / block))
    edges = [round(i * s / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


_MASKS: dict = {}


def _tri_mask(n: int, dtype, device) -> torch.Tensor:
    """Additive [n, n] mask, -inf above the diagonal (the diagonal block of a row block)."""
    key = (n, dtype, device)
    if key not in _MASKS:
        _MASKS[key] = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)
    return _MASKS[key]


def _flat(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """[b, h, s, d] -> contiguous [b*h, s, d] (in `dtype`), copying only when needed."""
    x = x.to(dtype or x.dtype, memory_format=torch.contiguous_format)
    return x.reshape(-1, *x.shape[2:])


def _scores(a: torch.Tensor, bt: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * a @ bt in fp32 ([n, m, k] @ [n, k, l]).

    fp32 inputs: one fp32 batched matmul. bf16 inputs: hi = bf16(alpha a bt), then the residual
    alpha a bt - hi from a second bf16 matmul whose fp32 accumulator subtracts hi before rounding
    (baddbmm, beta=-1). hi + lo carries ~16 significant bits where a bf16 result has 8: ~1e-5 relative
    error, far below the bf16 rounding of P and dS that follows, for two bf16 matmuls, which cost less
    than half of one fp32 matmul on AVX512-bf16.
    """
    if a.dtype == torch.float32:
        out = torch.bmm(a, bt)
        return out.mul_(alpha) if alpha != 1.0 else out
    hi = torch.bmm(a, bt)
    if alpha != 1.0:
        hi.mul_(alpha)
    lo = torch.baddbmm(hi, a, bt, beta=-1.0, alpha=alpha)
    return hi.float().add_(lo)


def _rows(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a flat [n, s, d] tensor as a contiguous [n, r1 - r0, d] (bf16 batched matmuls
    copy non-contiguous operands themselves, once per call: copy once here instead)."""
    return x[:, r0:r1].contiguous()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b, h, s, d = q.shape
    dtype = q.dtype
    q3, k3, v3 = _flat(q), _flat(k), _flat(v)
    # [b, h, s, d] stored as [b, s, h, d]: the caller's out.transpose(1, 2).reshape(b, s, h*d) is a view
    out = torch.empty(b, s, h, d, dtype=dtype, device=q.device).transpose(1, 2)
    probs = []
    for r0, r1 in _blocks(s, block):
        sc = _scores(_rows(q3, r0, r1), _rows(k3, 0, r1).transpose(1, 2), scale)  # fp32 scores
        sc[..., r0:] += _tri_mask(r1 - r0, sc.dtype, sc.device)
        torch.softmax(sc, dim=-1, out=sc)
        p = sc.to(dtype)
        probs.append(p)
        out[:, :, r0:r1] = torch.bmm(p, _rows(v3, 0, r1)).view(b, h, r1 - r0, d)
    return out, probs


def _backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              probs: list[torch.Tensor], scale: float, block: int) -> tuple[torch.Tensor, ...]:
    b, h, s, d = q.shape
    dtype = q.dtype
    q3, k3, v3, g3 = _flat(q), _flat(k), _flat(v), _flat(g)
    # D_i = sum_j P_ij dP_ij = dO_i . O_i (fp32)
    delta = (g3.float() * _flat(out)).sum(-1, keepdim=True)
    dq = torch.empty_like(q3)
    dk = torch.zeros(q3.shape, dtype=torch.float32, device=q3.device)  # fp32 accumulators over row blocks
    dv = torch.zeros_like(dk)
    for (r0, r1), p in zip(_blocks(s, block), probs):
        gi = _rows(g3, r0, r1)
        ds = _scores(gi, _rows(v3, 0, r1).transpose(1, 2), 1.0)  # dP, fp32
        ds.sub_(delta[:, r0:r1]).mul_(p)
        ds = ds.mul_(scale).to(dtype)  # scale * dS
        dq[:, r0:r1] = torch.bmm(ds, _rows(k3, 0, r1))
        dk[:, :r1] += torch.bmm(ds.transpose(1, 2), _rows(q3, r0, r1))
        dv[:, :r1] += torch.bmm(p.transpose(1, 2), gi)
    shape = (b, h, s, d)
    return dq.view(shape), dk.to(dtype).view(shape), dv.to(dtype).view(shape)


# Registered as custom ops so torch.compile treats the kernel as one opaque call (inductor traced
# into the Python loop otherwise and produced slower code than eager for small blocks).
@torch.library.custom_op("trident::causal_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return _forward(q, k, v, scale, block)


@_attention_op.register_fake
def _(q, k, v, scale, block):
    b, h, s, d = q.shape
    out = q.new_empty(b, s, h, d).transpose(1, 2)
    return out, [q.new_empty(b * h, r1 - r0, r1) for r0, r1 in _blocks(s, block)]


@torch.library.custom_op("trident::causal_attention_backward", mutates_args=())
def _attention_backward_op(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           probs: list[torch.Tensor], scale: float,
                           block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(g, q, k, v, out, probs, scale, block)


@_attention_backward_op.register_fake
def _(g, q, k, v, out, probs, scale, block):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, block = inputs
    out, probs = output
    ctx.save_for_backward(q, k, v, out, *probs)
    ctx.scale, ctx.block = scale, block


def _attention_grad(ctx, g_out, _g_probs):
    q, k, v, out, *probs = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(g_out, q, k, v, out, probs, ctx.scale, ctx.block)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


# ---- the fused C++ kernel (bf16, AVX512-BF16) ------------------------------------------------------

_SOURCE = Path(__file__).with_name("csrc") / "attention_cpu.cpp"
_ISA = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_native_ok: bool | None = None  # a plain global, not functools.cache: torch.compile reads it as a constant


def native_kernel_available() -> bool:
    """Build (once per machine, cached by torch) and load csrc/attention_cpu.cpp; False where it cannot
    run: TRIDENT_CPU_KERNELS=0, no AVX512-BF16, or a failed build (warned once)."""
    global _native_ok
    if _native_ok is None:
        _native_ok = _load_native()
    return _native_ok


def _load_native() -> bool:
    if os.environ.get("TRIDENT_CPU_KERNELS", "1") == "0" or not {"avx512_bf16", "avx512bw"} <= _cpu_flags():
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name="trident_attention_cpu", sources=[str(_SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-fopenmp", *_ISA], extra_ldflags=["-fopenmp"])
        return True
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use the Python kernel
        first_line = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"trident: fused CPU attention unavailable ({type(e).__name__}: {first_line}); "
                      "using the blocked Python kernel", RuntimeWarning, stacklevel=3)
        return False


@torch.library.custom_op("trident::fused_causal_attention", mutates_args=())
def _fused_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              q_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.trident_cpu.causal_attention_forward(q, k, v, scale, q_pos)


@_fused_op.register_fake
def _(q, k, v, scale, q_pos):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("trident::fused_causal_attention_backward", mutates_args=())
def _fused_backward_op(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       scale: float, q_pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.trident_cpu.causal_attention_backward(g, q, k, v, lse, scale, q_pos)


@_fused_backward_op.register_fake
def _(g, q, k, v, lse, scale, q_pos):
    def bshd(t):
        b, h, s, d = t.shape
        return t.new_empty(b, s, h, d).transpose(1, 2)
    return bshd(q), bshd(k), bshd(k)


def _fused_setup_context(ctx, inputs, output):
    q, k, v, scale, q_pos = inputs
    ctx.save_for_backward(q, k, v, output[1], q_pos)
    ctx.scale = scale


def _fused_grad(ctx, g_out, _g_lse):
    q, k, v, lse, q_pos = ctx.saved_tensors
    return (*_fused_backward_op(g_out, q, k, v, lse, ctx.scale, q_pos), None, None)


_fused_op.register_autograd(_fused_grad, setup_context=_fused_setup_context)


def fused_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                           q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """causal_attention through the C++ kernel: bf16 q [b, h, sq, d], k and v [b, h, sk, d] (d % 16 == 0;
    copied first if their last stride is not 1). q_pos (int64 [b, sq]): query i sees keys 0..q_pos[:, i];
    None: sq == sk, causal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _fused_op(q, k, v, float(scale), q_pos)[0]


def _fused_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, enable_gqa: bool,
                   q_pos: torch.Tensor | None = None) -> bool:
    """What the C++ kernel handles: bf16 CPU [b, h, s, d] with d % 16 == 0, k and v of one shape (heads
    equal to q's or, with GQA, dividing them), a positive scale, int64 CPU query positions."""
    heads_ok = k.shape[1] == q.shape[1] or (enable_gqa and q.shape[1] % k.shape[1] == 0)
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and q.dim() == k.dim() == 4
            and q.shape[-1] % 16 == 0 and k.shape == v.shape and k.shape[0] == q.shape[0]
            and k.shape[-1] == q.shape[-1] and heads_ok and (scale is None or scale > 0)
            and (q_pos is None or (q_pos.dtype == torch.long and q_pos.device.type == "cpu"))
            and native_kernel_available())


def _upcast(q: torch.Tensor) -> bool:
    """bf16 / fp16 on a CPU without native low-precision GEMMs (no AVX512-BF16 / AMX): torch's kernels
    for them are ~10x slower than fp32 there, so attention runs in fp32 (kernels/matmul.py)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and not native_low_precision_gemm(q.dtype) and not torch.compiler.is_compiling())


def _repeat_kv_heads(q, k, v, enable_gqa: bool):
    """k, v with as many heads as q (GQA: each KV head repeated for its group of query heads); our
    kernels take equal head counts and autograd sums the repeats' gradients back."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return k, v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     block: int = BLOCK) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for q, k, v [b, h, s, d] with equal head counts (the
    blocked Python kernel)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _attention_op(q, k, v, float(scale), int(block))[0]


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for F.scaled_dot_product_attention: our kernels for causal self-attention on CPU."""
    if _upcast(q):
        return scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa).to(q.dtype)
    causal = (is_causal and attn_mask is None and dropout_p == 0.0 and q.device.type == "cpu" and q.dim() == 4
              and q.shape[-2] == k.shape[-2] and q.dtype == k.dtype == v.dtype)
    fused = causal and _fused_applies(q, k, v, scale, enable_gqa)
    blocked = (causal and not fused and q.shape[-2] >= MIN_SEQ and q.dtype in (torch.float32, torch.bfloat16)
               and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if not (fused or blocked):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    k, v = _repeat_kv_heads(q, k, v, enable_gqa)
    return fused_causal_attention(q, k, v, scale) if fused else causal_attention(q, k, v, scale)


def attention_at_positions(q, k, v, q_pos: torch.Tensor, scale: float | None = None,
                           enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention for chosen query rows: q [b, h, r, d] holds the queries of positions q_pos
    ([b, r] int64) of a sequence whose keys and values are k, v [b, h_kv, s, d]; query i sees keys
    0..q_pos[:, i]. The fused kernel where it applies, else torch's SDPA with the equivalent mask."""
    if _upcast(q):
        return attention_at_positions(q.float(), k.float(), v.float(), q_pos, scale, enable_gqa).to(q.dtype)
    k, v = _repeat_kv_heads(q, k, v, enable_gqa)
    if _fused_applies(q, k, v, scale, True, q_pos):
        return fused_causal_attention(q, k, v, scale, q_pos=q_pos)
    mask = q_pos[:, None, :, None] >= torch.arange(k.shape[-2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
