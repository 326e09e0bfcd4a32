"""AdamW with fp32 master weights over a model split across ranks, and its learning-rate schedule.

Why master weights: a bf16 (or fp16) parameter cannot absorb updates smaller than ~1/256 of its value,
so the optimizer keeps an fp32 copy, steps that, and writes the rounded result back (Megatron's
recipe). fp32 parameters are their own masters (no extra memory, no copies). The step reads the fp32
gradient buffer (`param.main_grad`, parallel/ddp.py), runs one fused kernel per weight-decay group and
one multi-tensor copy back; its state (moments, masters, step) lives on the parameters' device.
NVIDIA apex's FusedAdam does the update instead where it imports on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels.apex import nvidia_apex
from parallel.config import NonNegFloat, NonNegInt, PositiveFloat
from parallel.grads import grad_of


@dataclass
class OptimConfig:
    lr: NonNegFloat = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: NonNegFloat = 1e-4
    """Floor of the cosine decay."""
    warmup_steps: NonNegInt = 10
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: NonNegFloat = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: PositiveFloat = 1e-8
    """AdamW epsilon."""
    clip_grad: NonNegFloat = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    distributed: bool = False
    """ZeRO-1, Megatron's distributed optimizer: fp32 master weights and Adam moments sharded over the
    DP group, gradients reduce-scattered, updated parameters all-gathered (6 + 12/dp bytes per bf16
    parameter instead of 18)."""
    overlap_param_gather: bool = False
    """With `distributed`: the parameter all-gather runs asynchronously and each module waits for its
    own buckets just before its forward (Megatron's overlap_param_gather)."""


def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Linear warmup then cosine decay to min_lr (`step` counts optimizer steps taken, from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """No decay on norms, biases and other 1-D parameters (the usual Llama recipe)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MasterWeightAdamW:
    """AdamW whose state and master weights are fp32 whatever the model's parameter dtype.

    A group's "params" are the tensors it updates: whole parameters, or (ZeRO-1) the flat slices of
    the parameter buffer this rank owns, with their fp32 gradient slices as "grads" (by default a
    parameter's `main_grad`, else `.grad`)."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8):
        self.groups = [(g["weight_decay"], list(g["params"])) for g in groups if g["params"]]
        self.model_params = [p for _, ps in self.groups for p in ps]
        given = [g.get("grads") for g in groups if g["params"]]
        self.grads = [t for g in given for t in g] if all(g is not None for g in given) and given else None
        device = self.model_params[0].device if self.model_params else torch.device("cpu")
        self.masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.model_params]
        self.low = [(p, m) for p, m in zip(self.model_params, self.masters) if m is not p]
        self.exp_avg = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
        self.step_t = torch.zeros((), dtype=torch.float32, device=device)
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.apex = None
        apex = nvidia_apex() if device.type == "cuda" else None
        if apex is not None:
            masters = iter(self.masters)
            self.apex = apex.optimizers.FusedAdam(
                [{"params": [next(masters) for _ in ps], "weight_decay": wd} for wd, ps in self.groups],
                lr=lr, betas=self.betas, eps=eps, adam_w_mode=True)

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def _grads(self) -> list[torch.Tensor]:
        return self.grads if self.grads is not None else [grad_of(p).float() for p in self.model_params]

    @torch.no_grad()
    def step(self) -> None:
        grads = self._grads()
        self.step_t += 1
        if self.apex is not None:
            for m, g in zip(self.masters, grads):
                m.grad = g
            for group in self.apex.param_groups:
                group["lr"] = self.lr
            self.apex.step()
            for m in self.masters:
                m.grad = None
        else:
            start = 0
            for wd, ps in self.groups:
                idx = slice(start, start + len(ps))
                start += len(ps)
                torch._fused_adamw_(self.masters[idx], grads[idx], self.exp_avg[idx], self.exp_avg_sq[idx], [],
                                    [self.step_t] * len(ps), lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                                    weight_decay=wd, eps=self.eps, amsgrad=False, maximize=False)
        if self.low:
            torch._foreach_copy_([p for p, _ in self.low], [m for _, m in self.low])

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad.zero_()
        for m in self.masters:
            m.grad = None

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """The inverse of state_dict (lists in model-parameter order)."""
        self.step_t.copy_(sd["step"])
        for mine, theirs in ((self.exp_avg, sd["exp_avg"]), (self.exp_avg_sq, sd["exp_avg_sq"]),
                             (self.masters, sd["master"])):
            torch._foreach_copy_(mine, [t.to(m.device) for t, m in zip(theirs, mine)])
        if self.apex is not None:  # apex keeps its own moments and step count: hand it these
            for m, a, b in zip(self.masters, self.exp_avg, self.exp_avg_sq):
                self.apex.state[m] = {"exp_avg": a, "exp_avg_sq": b}
            for group in self.apex.param_groups:
                group["step"] = int(self.step_t.item())

    def state_dict(self) -> dict:
        """Moments and masters in model-parameter order (the handle names them)."""
        if self.apex is not None:
            inner = self.apex.state_dict()["state"]
            exp_avg = [inner[i]["exp_avg"] for i in range(len(self.masters))] if inner else self.exp_avg
            exp_avg_sq = [inner[i]["exp_avg_sq"] for i in range(len(self.masters))] if inner else self.exp_avg_sq
        else:
            exp_avg, exp_avg_sq = self.exp_avg, self.exp_avg_sq
        return {"step": self.step_t.clone(), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "master": self.masters}
