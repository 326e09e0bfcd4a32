"""Optimizers over a model split across ranks: AdamW with fp32 master weights for low-precision params.

Why master weights: a bf16 parameter cannot absorb updates smaller than ~1/256 of its value, so the
optimizer keeps an fp32 copy, steps that, and writes the rounded result back (Megatron's recipe).
"""
from __future__ import annotations

import torch

from parallel.grads import grad_of


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """No decay on norms, biases and other 1-D parameters (the usual Llama recipe)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MasterWeightAdamW:
    """AdamW whose state and master weights are fp32 whatever the model's parameter dtype.

    For fp32 models the master copy *is* the parameter (no extra memory, no copies).
    """

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8):
        self.model_params = [p for g in groups for p in g["params"]]
        self.low_precision = any(p.dtype != torch.float32 for p in self.model_params)
        if self.low_precision:
            masters = []
            for g in groups:
                masters.append({**g, "params": [p.detach().float().clone().requires_grad_() for p in g["params"]]})
            groups = masters
        self.master_params = [p for g in groups for p in g["params"]]
        # torch's fused AdamW kernel (CPU and CUDA): one pass per tensor, 3-5x faster than foreach on CPU
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def set_lr(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def step(self) -> None:
        if self.low_precision:
            for m, p in zip(self.master_params, self.model_params):
                g = grad_of(p)
                m.grad = None if g is None else g.float()
        else:
            for p in self.model_params:
                if hasattr(p, "main_grad"):
                    p.grad = p.main_grad  # fp32 already: the buffer view itself
        self.inner.step()
        if self.low_precision:
            torch._foreach_copy_(self.model_params, self.master_params)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad.zero_()
        if self.low_precision:
            for m in self.master_params:
                m.grad = None

    def state_dict(self) -> dict:
        return self.inner.state_dict()
