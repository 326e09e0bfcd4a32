"""FP8 linear layers on torch._scaled_mm (CUDA; its exact equivalent on CPU), HYBRID format, delayed or
current scaling.

Each GEMM of a linear layer runs in FP8 with per-tensor scales (x_fp8 = saturate(x * scale)):
  fprop  y  = x_e4m3 @ w_e4m3^T
  dgrad  dx = g_e5m2 @ w_e4m3
  wgrad  dw = g_e5m2^T @ x_e4m3        (tokens padded to a multiple of 16 for the GEMM's inner dim)
Only the FP8 copies of x and w are kept for backward (half the bytes of bf16).

Scaling (one FP8Meta per layer: scales for x, w and g):
  current  each tensor's scale comes from its own amax, all-reduced (MAX) over the TP group first, so
           every TP rank quantizes with the scale the unsplit tensor would get (TP2 == TP1 up to
           accumulation order).
Scales are powers of two (the largest that keeps amax * scale <= fp8 max / 2^margin): exact in bf16,
so quantizing and dequantizing add no error beyond FP8's own rounding (a bf16-rounded arbitrary scale
would bias every product by up to 0.4%).
  delayed  Transformer Engine's DelayedScaling: the amax of every tensor seen during a step is
           recorded; at the step's end (FP8Group.step_end) the amaxes of all layers are all-reduced
           (MAX) in one collective over TP and DP, pushed into an amax history, and the next step's
           scales are fp8_max / amax / 2^margin. Before a layer's first update (empty history) it
           scales like `current` (TE starts at scale 1, which flushes small weights to zero).
"""
from __future__ import annotations

import torch

from kernels import matmul
from parallel import comm
from parallel.errors import ConfigError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
X, W, G = 0, 1, 2
FORMATS = (E4M3, E4M3, E5M2)
GEMM_MULTIPLE = 16
"""torch._scaled_mm (cuBLASLt on CUDA) needs every GEMM dimension but the rows of its first operand to
be a multiple of 16."""


def _fmax(which: int) -> float:
    return float(torch.finfo(FORMATS[which]).max)


def quantize(t: torch.Tensor, scale: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """Saturating cast of t * scale to an FP8 format (values beyond its max clamp, never NaN), as a
    row-major matrix (what cuBLASLt wants for _scaled_mm's first operand). The scale is a power of
    two, so multiplying a bf16 tensor by it is exact and its reciprocal undoes it exactly."""
    fmax = torch.finfo(fmt).max
    return torch.mul(t, scale).clamp_(-fmax, fmax).to(fmt).contiguous()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) of FP8 operands, accumulated in fp32: torch._scaled_mm.

    On CPU, torch hands _scaled_mm to oneDNN, whose FP8 matmul on AVX512-FP16 CPUs is a reference
    kernel about 10^4 times slower than a bf16 GEMM (5.4 s against 0.4 ms for 256 x 512 x 1376,
    measured 2026-12-03). Every e4m3 / e5m2 value is exactly a bf16 value and the scales are powers
    of two, so a GEMM with fp32 accumulation of the operands' bf16 images computes the same products
    and sums; only the accumulation order may differ (tests/test_precision.py checks it against
    torch._scaled_mm). Where the CPU has no native bf16 GEMM, the images are fp32 (kernels/matmul.py)."""
    if a.device.type != "cpu":
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    image = torch.bfloat16 if matmul.native_low_precision_gemm(torch.bfloat16) else torch.float32
    y = torch.mm(a.to(image), b.to(image))
    return (y.float() * (scale_a * scale_b)).to(out_dtype)


def pow2_scale(fmax, amax: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """The largest power of two s with amax * s <= fmax / 2^margin (1 where amax is 0 or not finite)."""
    s = torch.exp2(torch.floor(torch.log2(fmax / amax)) - margin)
    return torch.where((amax > 0) & torch.isfinite(amax), s, torch.ones_like(s))


class FP8Group:
    """Scaling state of every FP8 layer of one model: scales [n, 3], amax history [L, n, 3] and the
    amaxes seen this step [n, 3] (x, w, g), all on the model's device."""

    def __init__(self, names: list[str], cfg, device: torch.device, tp_group, reduce_groups: list):
        n = len(names)
        self.names, self.cfg, self.tp_group, self.reduce_groups = names, cfg, tp_group, reduce_groups
        self.scale = torch.ones(n, 3, device=device)
        self.history = torch.zeros(cfg.amax_history, n, 3, device=device)
        self.pending = torch.zeros(n, 3, device=device)
        self.fmax = torch.tensor([_fmax(X), _fmax(W), _fmax(G)], device=device)
        self.started = False  # delayed scaling: no step has ended yet (the history is empty)

    def meta(self, i: int) -> "FP8Meta":
        return FP8Meta(self, i)

    @torch.no_grad()
    def step_end(self) -> None:
        """Delayed scaling: reduce this step's amaxes over TP and DP, push them into the history and
        compute the next scales (no host sync). Nothing to do for current scaling."""
        if self.cfg.recipe != "delayed" or not len(self.names):
            return
        for g in self.reduce_groups:
            comm.all_reduce(self.pending, g, "max")
        self.history.copy_(torch.roll(self.history, 1, dims=0))
        self.history[0].copy_(self.pending)
        amax = self.history[0] if self.cfg.amax_compute == "most_recent" else self.history.amax(0)
        seen = (amax > 0) & torch.isfinite(amax)
        self.scale.copy_(torch.where(seen, pow2_scale(self.fmax, amax, self.cfg.margin), self.scale))
        self.pending.zero_()
        self.started = True

    def state_dict(self) -> dict:
        return {"names": list(self.names), "scale": self.scale.clone(), "history": self.history.clone(),
                "started": self.started}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["names"]) != self.names or sd["history"].shape != self.history.shape:
            raise ConfigError("fp8 state does not match this model's FP8 layers or amax_history length")
        self.scale.copy_(sd["scale"])
        self.history.copy_(sd["history"])
        self.started = bool(sd["started"])


class FP8Meta:
    """One layer's view into its FP8Group."""

    def __init__(self, group: FP8Group, index: int):
        self.group, self.index = group, index

    def quantize(self, t: torch.Tensor, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t in FP8, the fp32 scalar that undoes its scale)."""
        grp = self.group
        amax = t.detach().abs().amax().float()
        if grp.cfg.recipe == "current" or not grp.started:
            comm.all_reduce(amax, grp.tp_group, "max")
            scale = pow2_scale(grp.fmax[which], amax, grp.cfg.margin)
        else:
            scale = grp.scale[self.index, which]
        if grp.cfg.recipe == "delayed":
            slot = grp.pending[self.index, which:which + 1]
            torch.maximum(slot, amax.view(1), out=slot)
        return quantize(t, scale, FORMATS[which]), scale.reciprocal()


def _pad_rows(q: torch.Tensor, multiple: int) -> torch.Tensor:
    rows = -(-q.shape[0] // multiple) * multiple
    if rows == q.shape[0]:
        return q
    out = torch.zeros(rows, q.shape[1], dtype=q.dtype, device=q.device)
    out[: q.shape[0]] = q
    return out


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, meta):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, x_inv = meta.quantize(x2, X)
        wq, w_inv = meta.quantize(weight, W)
        y = scaled_mm(xq, wq.t(), x_inv, w_inv, x.dtype)
        ctx.save_for_backward(xq, wq, x_inv, w_inv)
        ctx.meta, ctx.shape, ctx.weight_dtype = meta, shape, weight.dtype
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        xq, wq, x_inv, w_inv = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gq, g_inv = ctx.meta.quantize(g2, G)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # [M, N] @ [N, K], the second operand column-major
            dx = scaled_mm(gq, wq.t().contiguous().t(), g_inv, w_inv, g.dtype)
            dx = dx.view(ctx.shape)
        if ctx.needs_input_grad[1]:  # [N, M] @ [M, K]: tokens are the inner dim, padded with zeros
            gt = _pad_rows(gq, GEMM_MULTIPLE).t().contiguous()
            xt = _pad_rows(xq, GEMM_MULTIPLE).t().contiguous()
            dw = scaled_mm(gt, xt.t(), g_inv, x_inv, torch.float32)
            dw = dw.to(ctx.weight_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, meta: FP8Meta) -> torch.Tensor:
    y = _FP8Linear.apply(x, weight, meta)
    return y + bias if bias is not None else y


def check_gemm_shape(name: str, weight: torch.Tensor) -> None:
    """A one-line error for a layer whose widths the FP8 GEMM cannot take."""
    bad = [d for d in weight.shape if d % GEMM_MULTIPLE]
    if bad:
        raise ConfigError(f"precision fp8: layer {name} has a per-rank width of {bad[0]}, not a multiple of "
                          f"{GEMM_MULTIPLE} (what the FP8 GEMM needs); resize the model or use bf16")
