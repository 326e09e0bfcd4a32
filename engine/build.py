"""What every recipe builds the same way: a model's pipeline chunks on this rank (from a checkpoint, a
policy with a fresh scalar head, or random weights), its precision policy and its training handle, and
the checks that must pass before any of that starts."""
from __future__ import annotations

import torch

from engine import checkpoint as ckpt
from engine.config import ModelConfig, ParallelConfig, PrecisionSettings
from engine.errors import ConfigError
from engine.layout import kv_heads_per_rank
from engine.model import Transformer
from parallel.fp8 import GEMM_MULTIPLE
from parallel.handle import ModelHandle
from parallel.optimizer import OptimConfig
from parallel.pipeline import partition_layers
from parallel.precision import PrecisionPolicy
from parallel.state import ParallelState


class ValueHeadSource:
    """A policy's weights with a fresh scalar head: zero (a critic starts at value 0) or small random
    (a reward model needs trunk gradients from its first step)."""

    def __init__(self, actor_source, head_std: float = 0.0, seed: int = 0):
        self.inner, self.head_std, self.seed = actor_source, head_std, seed
        self.config = ModelConfig(**{**vars(actor_source.config), "value_head": True})

    def shape(self, name):
        return (1, self.inner.config.hidden_size) if name == "score.weight" else self.inner.shape(name)

    def read(self, name, dim, start, length, shape=None):
        if name == "score.weight":
            g = torch.Generator().manual_seed(self.seed)
            return torch.randn(1, self.inner.config.hidden_size, generator=g) * self.head_std
        return self.inner.read(name, dim, start, length, shape)


def with_value_head(source, head_std: float = 0.0, seed: int = 0):
    """`source` itself when it already has a scalar head, else its trunk with a fresh one."""
    return source if source.config.value_head else ValueHeadSource(source, head_std, seed)


def stage_layers(num_layers: int, par: ParallelConfig) -> list[range]:
    """Layer range of every virtual stage (chunk c of pipeline rank r is stage c * pp + r)."""
    return partition_layers(num_layers, par.pp * par.virtual_stages, par.layer_split)


def check_parallel(par: ParallelConfig, model_cfg: ModelConfig, micro_batches: int) -> None:
    """Parallel sizes against the model and the schedule, before any process group exists."""
    model_cfg.validate_tp(par.tp)
    if (par.virtual_stages > 1) != (par.schedule == "interleaved"):
        raise ConfigError("parallel.virtual_stages > 1 goes with parallel.schedule=interleaved (and only then)")
    if par.virtual_stages > 1 and micro_batches % par.pp:
        raise ConfigError(f"interleaved pipelining needs micro-batches per step ({micro_batches}) divisible by "
                          f"pp ({par.pp})")
    stage_layers(model_cfg.num_layers, par)


def check_precision(settings: PrecisionSettings, model_cfg: ModelConfig, tp: int) -> None:
    """fp8: every decoder GEMM width per TP rank must suit the FP8 GEMM (checked again on the built
    layers, parallel/fp8.check_gemm_shape); here it fails before anything is built."""
    if settings.precision != "fp8":
        return
    hd = model_cfg.head_dim
    kv_local = kv_heads_per_rank(model_cfg, tp)[0] * hd
    widths = {"hidden_size": model_cfg.hidden_size, "query heads x head_dim / tp": model_cfg.num_heads * hd // tp,
              "qkv rows / tp": model_cfg.num_heads * hd // tp + 2 * kv_local,
              "intermediate_size / tp": model_cfg.intermediate_size // tp}
    for what, w in widths.items():
        if w % GEMM_MULTIPLE:
            raise ConfigError(f"precision fp8 needs GEMM widths that are multiples of {GEMM_MULTIPLE}: "
                              f"{what} is {w}")


def precision_policy(settings: PrecisionSettings, device: torch.device) -> PrecisionPolicy:
    return PrecisionPolicy(settings.precision, settings.loss_scale, settings.fp8, device)


def build_chunks(source, model_cfg: ModelConfig, par: ParallelConfig, state: ParallelState, dtype: torch.dtype,
                 seed: int = 0) -> list[Transformer]:
    """This rank's model chunks (one without interleaving) on the state's device, loaded from `source`
    or random weights (identical at any TP x PP layout)."""
    stages = stage_layers(model_cfg.num_layers, par)
    chunks = []
    for c in range(par.virtual_stages):
        chunk = Transformer(model_cfg, state, sequence_parallel=par.sequence_parallel, recompute=par.recompute,
                            dtype=dtype, layers=stages[c * state.pp + state.pp_rank])
        ckpt.load_into(chunk, source or ckpt.RandomSource(model_cfg, seed))
        if par.compile:
            chunk.compile_layers()
        chunks.append(chunk)
    return chunks


def activation_shape(model_cfg: ModelConfig, state: ParallelState, sequence_parallel: bool, ids=lambda mb: mb):
    """Shape of the hidden state passed between pipeline stages for a micro-batch; ids(mb) gives its
    [b, s] token ids."""
    def shape(mb):
        b, s = ids(mb).shape
        return (b, s // state.tp if sequence_parallel and state.tp > 1 else s, model_cfg.hidden_size)
    return shape


def build_handle(source, state: ParallelState, par: ParallelConfig, settings: PrecisionSettings,
                 optim: OptimConfig | None, total_steps: int = 1, ids=lambda mb: mb, seed: int = 0) -> ModelHandle:
    """A model's training handle on this rank (frozen without `optim`)."""
    policy = precision_policy(settings, state.device)
    chunks = build_chunks(source, source.config, par, state, policy.param_dtype, seed)
    return ModelHandle(chunks, state, policy, optim, total_steps, par.schedule,
                       activation_shape(source.config, state, par.sequence_parallel, ids))
