"""Rotary position embeddings (half-rotation layout, as HF Llama), with `llama3` frequency scaling."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [batch, seq, head_dim] for integer positions [batch, seq]."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor shaped like x whose memory order follows x's strides (x may be a strided view,
    e.g. q = qkv[..., :d].view(b, s, h, hd).transpose(1, 2): the result is then [b, s, h, hd] in memory)."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return torch.empty_permuted(x.shape, order, dtype=x.dtype, device=x.device)


def _rotate(x: torch.Tensor, c1, c2, s1, s2, sign: float) -> torch.Tensor:
    """[x1, x2] -> [x1*c1 - sign*x2*s1, x2*c2 + sign*x1*s2] without materialising rotate_half(x)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = _empty_like_layout(x)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c1, out=o1)
    o1.addcmul_(x2, s1, value=-sign)
    torch.mul(x2, c2, out=o2)
    o2.addcmul_(x1, s2, value=sign)
    return out


class _Rope(torch.autograd.Function):
    """out = x*cos + rotate_half(x)*sin; backward: gx = g*cos + rotate_half^T(g*sin), rotate_half^T(y) = [y2, -y1].

    Four half-width multiply(-add)s each way instead of mul, neg, cat, mul, add (and their backward with
    a cat and a split); saves nothing but cos and sin.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, c1, c2, s1, s2, 1.0)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        # gx1 = g1*c1 + g2*s2 ; gx2 = g2*c2 - g1*s1: the forward rotation with (s1, s2) swapped, sign -1
        return _rotate(g, cos[..., :h], cos[..., h:], sin[..., h:], sin[..., :h], -1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    if (x.shape[-1] % 2 or cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling()
            or cos.dtype != x.dtype or sin.dtype != x.dtype):
        return apply_rope_reference(x, cos, sin)  # inductor fuses the reference into one loop anyway
    return _Rope.apply(x, cos, sin)
