"""Precision policies, owned by the training handle (parallel/handle.py), never by recipes.

  fp32  fp32 parameters, gradients and optimizer.
  bf16  bf16 parameters and activations; fp32 gradient buffer, master weights and Adam moments.
  fp16  as bf16 with fp16, plus a dynamic loss scaler (Megatron's DynamicGradScaler): the loss is
        multiplied by the scale before backward, the fp32 main gradients are unscaled and checked for
        inf/nan (all-reduced MAX over every group the model spans, so all ranks skip together); an
        overflowing step is skipped without advancing the LR schedule.
  fp8   bf16 everywhere except the GEMMs of the decoder's linear layers (fprop, dgrad, wgrad), which
        run in FP8 (HYBRID: e4m3 forward, e5m2 gradients) with delayed or current scaling
        (parallel/fp8.py), through Transformer Engine where it imports on CUDA, else trident's (torch._scaled_mm on CUDA).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from parallel.config import NonNegInt, PositiveFloat, PositiveInt
from parallel.errors import ConfigError, TrainingError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
Precision = Literal["fp32", "bf16", "fp16", "fp8"]
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass
class LossScaleConfig:
    """fp16's dynamic loss scaler (Megatron's DynamicGradScaler; its names in brackets)."""

    initial: PositiveFloat = 2.0 ** 16
    """Starting scale (initial_loss_scale)."""
    min: PositiveFloat = 1.0
    """Smallest scale (min_loss_scale). A backoff that would go below it stops the run: fp16 has
    diverged, and clamping would only hide it."""
    growth_interval: PositiveInt = 1000
    """Clean steps in a row after which the scale grows (loss_scale_window)."""
    hysteresis: PositiveInt = 2
    """Overflowing steps tolerated before the scale backs off; reset when the scale grows."""
    growth_factor: float = 2.0
    """Multiplier after `growth_interval` clean steps."""
    backoff_factor: float = 0.5
    """Multiplier when hysteresis runs out (0 < backoff < 1)."""

    def __post_init__(self):
        if not 0 < self.backoff_factor < 1:
            raise ConfigError(f"loss_scale.backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_factor <= 1:
            raise ConfigError(f"loss_scale.growth_factor must be > 1, got {self.growth_factor}")
        if self.initial < self.min:
            raise ConfigError(f"loss_scale.initial ({self.initial:g}) is below loss_scale.min ({self.min:g})")


@dataclass
class FP8Config:
    """FP8 GEMMs for the decoder's linear layers (HYBRID format: e4m3 forward, e5m2 gradients)."""

    recipe: Literal["delayed", "current"] = "current"
    """current: each tensor's scale comes from its own amax, reduced over the TP group (tensor-wise;
    TE's Float8CurrentScaling); delayed: from the amax history of earlier steps (TE's DelayedScaling),
    reduced over TP and DP once per step. current is the default: no stale scales (measured closer to
    bf16 on the demo SFT, README), at the price of one small TP all-reduce per quantized tensor."""
    amax_history: PositiveInt = 16
    """Steps of amax history per tensor (delayed scaling)."""
    amax_compute: Literal["max", "most_recent"] = "max"
    """How the history becomes the amax a scale is computed from (delayed scaling)."""
    margin: NonNegInt = 0
    """Scale = fp8 max / amax / 2^margin: headroom against growth between scale updates."""
    backend: Literal["auto", "te", "torch"] = "auto"
    """te: Transformer Engine's layers (CUDA with transformer_engine installed); torch: trident's FP8
    linear (torch._scaled_mm on CUDA, its exact equivalent on CPU); auto: te where it imports on CUDA, else torch."""


class DynamicGradScaler:
    """Megatron's DynamicGradScaler, with a stop instead of a clamp at the minimum.

    Overflow: the growth count restarts and hysteresis counts down; when it is spent the scale backs
    off. Clean step: the growth count goes up; after `growth_interval` clean steps the scale grows and
    hysteresis is restored. The scale is a Python float (multiplying the loss by it needs no sync).
    """

    def __init__(self, cfg: LossScaleConfig):
        self.cfg = cfg
        self.scale = float(cfg.initial)
        self.growth_tracker = 0
        self.hysteresis_tracker = cfg.hysteresis

    def update(self, found_inf: bool) -> None:
        cfg = self.cfg
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                backed_off = self.scale * cfg.backoff_factor
                if backed_off < cfg.min:
                    raise TrainingError(f"fp16 loss scale would fall below loss_scale.min={cfg.min:g} "
                                        f"(from {self.scale:g}): gradients overflow at every scale; the run stops")
                self.scale = backed_off
        else:
            self.growth_tracker += 1
            if self.growth_tracker == cfg.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = cfg.hysteresis
                self.scale *= cfg.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.growth_tracker = int(sd["growth_tracker"])
        self.hysteresis_tracker = int(sd["hysteresis_tracker"])


def te_available(device: torch.device) -> bool:
    """Transformer Engine's PyTorch layers import (CUDA only; imported lazily, never at module load)."""
    if device.type != "cuda":
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # absent, or installed without a working CUDA build
        return False


class PrecisionPolicy:
    """One model's precision: parameter dtype, loss scaler (fp16) and FP8 settings (fp8)."""

    def __init__(self, precision: str = "fp32", loss_scale: LossScaleConfig | None = None,
                 fp8: FP8Config | None = None, device: torch.device | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.name = precision
        self.param_dtype = PARAM_DTYPES[precision]
        self.scaler = DynamicGradScaler(loss_scale or LossScaleConfig()) if precision == "fp16" else None
        self.fp8 = (fp8 or FP8Config()) if precision == "fp8" else None
        self.backend = None
        if self.fp8 is not None:
            device = device or torch.device("cpu")
            want = self.fp8.backend
            if want == "te" and not te_available(device):
                raise ConfigError(f"fp8.backend=te needs transformer_engine.pytorch on CUDA (device {device}): "
                                  "install the `gpu` extra, or use fp8.backend=torch")
            self.backend = "te" if want == "te" or (want == "auto" and te_available(device)) else "torch"
            if self.backend == "te" and self.fp8.recipe == "current":
                from transformer_engine.common import recipe
                if not hasattr(recipe, "Float8CurrentScaling"):
                    raise ConfigError("fp8.recipe=current with fp8.backend=te needs Transformer Engine >= 2.2; "
                                      "use fp8.recipe=delayed or fp8.backend=torch")

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def autocast(self, fp8_group=None):
        """The context forward passes run in: TE's fp8_autocast with the HYBRID recipe for the TE
        backend (its amax reduction over `fp8_group`), nothing otherwise."""
        if self.backend != "te":
            return contextlib.nullcontext()
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe

        cfg = self.fp8
        if cfg.recipe == "current":
            fp8_recipe = recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
        else:
            fp8_recipe = recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=cfg.amax_history,
                                               amax_compute_algo=cfg.amax_compute, margin=cfg.margin)
        return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe, fp8_group=fp8_group)
