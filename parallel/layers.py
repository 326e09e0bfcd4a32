"""Tensor-parallel layers (Megatron-core names) and vocab-parallel losses that never gather logits.

Weights are laid out like nn.Linear ([out, in]). Parameters that are *not* unique per TP rank carry a
`Replica` record so gradient finalisation and the global grad norm treat them right (see grads.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import matmul
from parallel import comm


@dataclass
class Replica:
    """Rows [row_start:] of a parameter hold the same values on every rank of `group`.

    grads_partial: each rank's gradient is only its share of the true gradient (sequence parallelism,
    KV heads shared by several TP ranks), so finalisation all-reduces it over `group`.
    is_owner: this rank counts the rows in the global grad norm and writes them to checkpoints.
    """

    group: object
    is_owner: bool
    grads_partial: bool = False
    row_start: int = 0


def mark_replica(param: nn.Parameter, group, grads_partial: bool = False, row_start: int = 0) -> None:
    param.replica = Replica(group, comm.rank_in(group) == 0, grads_partial, row_start)


def _fp8_slots(layer: nn.Module, capable: bool) -> None:
    """fp8_capable: this GEMM may run in FP8 under an fp8 precision policy, which then sets fp8_meta
    (trident's FP8 GEMMs, parallel/fp8.py) or te (a Transformer Engine layer sharing the weight)."""
    layer.fp8_capable, layer.fp8_meta, layer.te = capable, None, None


def _linear(x, weight, bias, fp8_meta):
    if fp8_meta is None:
        return matmul.linear(x, weight, bias)
    from parallel.fp8 import fp8_linear
    return fp8_linear(x, weight, bias, fp8_meta)


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor-parallel size {d}")
    return n // d


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A split by output rows: each rank computes a slice of the output features.

    With sequence_parallel the input arrives split along the sequence and is all-gathered here (the
    backward reduce-scatters); otherwise it is replicated and its gradient all-reduced.
    """

    parallel_mode = "column"

    def __init__(self, in_features: int, out_features: int, group, bias: bool = False,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 local_out_features: int | None = None, dtype: torch.dtype | None = None,
                 skip_weight_param_allocation: bool = False, fp8: bool = False,
                 device: torch.device | None = None):
        super().__init__()
        tp = comm.world(group)
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.in_features = in_features
        self.out_per_rank = local_out_features or divide(out_features, tp, "output features")
        self.bias = nn.Parameter(torch.zeros(self.out_per_rank, dtype=dtype, device=device)) if bias else None
        if skip_weight_param_allocation:  # the weight is passed to forward (tied embeddings)
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype, device=device))
            nn.init.normal_(self.weight, std=0.02)
        _fp8_slots(self, fp8)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.te is not None:  # Transformer Engine's layer does its own TP/SP communication
            return self.te(x)
        if self.sequence_parallel:
            x = comm.gather_from_sequence_parallel_region(x, self.group)
        else:
            x = comm.copy_to_tensor_model_parallel_region(x, self.group)
        y = _linear(x, self.weight if weight is None else weight, self.bias, self.fp8_meta)
        return comm.gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T with A split by input columns: partial outputs are summed across ranks.

    With sequence_parallel the sum is a reduce-scatter along the sequence. The bias is added once,
    after the reduction.
    """

    parallel_mode = "row"

    def __init__(self, in_features: int, out_features: int, group, bias: bool = False,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 dtype: torch.dtype | None = None, fp8: bool = False, device: torch.device | None = None):
        super().__init__()
        tp = comm.world(group)
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        self.in_per_rank = divide(in_features, tp, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            mark_replica(self.bias, group, grads_partial=sequence_parallel)
        _fp8_slots(self, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.te is not None:
            return self.te(x)
        if not self.input_is_parallel:
            x = comm.scatter_to_tensor_model_parallel_region(x, self.group)
        y = _linear(x, self.weight, None, self.fp8_meta)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = comm.reduce_from_tensor_model_parallel_region(y, self.group)
        return y + self.bias if self.bias is not None else y


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    step = tp * multiple
    return int(math.ceil(vocab_size / step) * step)


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary; the vocab is padded up to a multiple of TP.

    Each rank looks up the ids in its range, zeros the rest, and the partial rows are summed
    (all-reduce, or reduce-scatter along the sequence under sequence parallelism).
    """

    def __init__(self, vocab_size: int, hidden: int, group, sequence_parallel: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        tp = comm.world(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size = vocab_size
        self.per_rank = padded_vocab_size(vocab_size, tp) // tp
        self.vocab_start = comm.rank_in(group) * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if comm.world(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.per_rank)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return comm.reduce_from_tensor_model_parallel_region(out, self.group)


# ---- vocab-parallel losses: logits stay split [..., V/tp] ------------------------------------------

CHUNK_ELEMENTS = 2**20
"""fp32 elements per row chunk of the vocab-parallel softmax (4 MB): its temporaries stay in cache
instead of a few [tokens, vocab] fp32 copies (measured on PPO L's 8192 x 4096 logits: the unchunked
casts, shifts and exps took ~1.5 s per update)."""


def _shifted_chunks(x: torch.Tensor, rows: int, inv_temp: float, ymax: torch.Tensor):
    """Row chunks of y = x / T - max as fresh fp32 tensors (never in place on the logits): (r0, r1, y)."""
    n = x.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        y = x[r0:r1].to(torch.float32, copy=True)
        if inv_temp != 1.0:
            y.mul_(inv_temp)
        yield r0, r1, y.sub_(ymax[r0:r1, None])


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """log softmax(z / T)[target] and the entropy of softmax(z / T), z a vocab slice per rank, fp32.

    Rows are processed in chunks; only the logits (input dtype) and three fp32 numbers per row are kept
    for backward, which recomputes each chunk's softmax. With y = z / T - max, p = softmax(y):
      d logp / dy_j = [j = target] - p_j,   d entropy / dy_j = -p_j (y_j - E_p[y]).
    """

    @staticmethod
    def forward(ctx, logits, target, group, start, inv_temp):
        x = logits.reshape(-1, logits.shape[-1])
        n, per_rank = x.shape
        rows = max(1, CHUNK_ELEMENTS // max(per_rank, 1))
        ymax = comm.all_reduce(x.amax(dim=-1).float() * inv_temp, group, "max")
        sums = torch.zeros(3, n, dtype=torch.float32, device=x.device)  # sum exp(y), sum exp(y) y, y[target]
        for r0, r1, y in _shifted_chunks(x, rows, inv_temp, ymax):
            e = torch.exp(y)
            sums[0, r0:r1] = e.sum(dim=-1)
            sums[1, r0:r1] = e.mul_(y).sum(dim=-1)
        if target is None:
            local = outside = None
        else:
            local = target.reshape(-1) - start
            outside = (local < 0) | (local >= per_rank)
            local = local.masked_fill(outside, 0)
            picked = x.gather(-1, local[:, None]).squeeze(-1).float() * inv_temp - ymax
            sums[2] = picked.masked_fill(outside, 0.0)
        sums = comm.all_reduce(sums, group)
        lse = sums[0].log()
        mean_y = sums[1] / sums[0]
        ctx.save_for_backward(logits, ymax, lse, mean_y, local, outside)
        ctx.inv_temp, ctx.rows = inv_temp, rows
        ctx.set_materialize_grads(False)
        shape = logits.shape[:-1]
        logp = (sums[2] - lse).view(shape) if target is not None else None
        return logp, (lse - mean_y).view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, ymax, lse, mean_y, local, outside = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        g_logp = None if g_logp is None else g_logp.reshape(-1).float()
        g_entropy = None if g_entropy is None else g_entropy.reshape(-1).float()
        grad = torch.empty_like(x)
        for r0, r1, y in _shifted_chunks(x, ctx.rows, ctx.inv_temp, ymax):
            p = torch.exp(y - lse[r0:r1, None])
            if g_entropy is not None:  # -p (g_logp + g_ent (y - E y))
                coef = y.sub_(mean_y[r0:r1, None]).mul_(g_entropy[r0:r1, None])
                if g_logp is not None:
                    coef.add_(g_logp[r0:r1, None])
                g = p.mul_(coef).neg_()
            else:
                g = p.mul_(-g_logp[r0:r1, None])
            if g_logp is not None and local is not None:
                g.scatter_add_(-1, local[r0:r1, None], (g_logp[r0:r1] * ~outside[r0:r1])[:, None])
            if ctx.inv_temp != 1.0:
                g.mul_(ctx.inv_temp)
            grad[r0:r1] = g
        return grad.view(logits.shape), None, None, None, None


def _safe_target(target: torch.Tensor) -> torch.Tensor:
    return target.clamp(min=0)  # ignore_index (-100) positions are masked by the caller


def _vocab_start(logits: torch.Tensor, group, vocab_start: int | None) -> int:
    # The last rank may hold fewer (unpadded) columns, so callers with padding pass the start.
    return comm.rank_in(group) * logits.shape[-1] if vocab_start is None else vocab_start


def vocab_parallel_log_probs_and_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                         vocab_start: int | None = None,
                                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy of p) per token, p = softmax(full logits / temperature); fp32, both
    differentiable, one pass over the logits (a policy loss with an entropy bonus needs both)."""
    start = _vocab_start(logits, group, vocab_start)
    return _VocabParallelLogProbEntropy.apply(logits, _safe_target(target), group, start, 1.0 / temperature)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, group,
                             vocab_start: int | None = None) -> torch.Tensor:
    """Per-token log p(target); fp32; equals log_softmax(full logits).gather(target)."""
    return vocab_parallel_log_probs_and_entropy(logits, target, group, vocab_start)[0]


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 vocab_start: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy (no reduction); equals F.cross_entropy(full logits, reduction='none')."""
    return -vocab_parallel_log_probs(logits, target, group, vocab_start)


def vocab_parallel_entropy(logits: torch.Tensor, group) -> torch.Tensor:
    """Per-token entropy of softmax(logits) over the split vocab, differentiable, fp32."""
    return _VocabParallelLogProbEntropy.apply(logits, None, group, 0, 1.0)[1]
