"""Typed run configuration: dataclasses (a docstring per field), one YAML file, `--a.b=c` overrides.

Every value is checked against its field's annotation (types, ranges, string options) in one place,
parallel/config.py, before anything starts: a bad value is one line naming its dotted path.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from engine.errors import ConfigError
from parallel.config import NonNegInt, PositiveFloat, PositiveInt, check, from_dict
from parallel.precision import FP8Config, LossScaleConfig, Precision

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# Scalar-head models (critics, reward models) use HF's sequence-classification classes with one label.
VALUE_ARCHITECTURES = {k.replace("CausalLM", "SequenceClassification"): v for k, v in ARCHITECTURES.items()}


@dataclass
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2)."""

    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    """Family: llama, mistral or qwen2 (decides HF class name and defaults such as qkv bias)."""
    vocab_size: PositiveInt = 512
    """Tokens in the vocabulary (unpadded; TP pads the embedding internally)."""
    hidden_size: PositiveInt = 128
    """Width of the residual stream."""
    intermediate_size: PositiveInt = 344
    """Width of the SwiGLU MLP."""
    num_layers: PositiveInt = 4
    """Decoder layers."""
    num_heads: PositiveInt = 4
    """Query heads."""
    num_kv_heads: PositiveInt | None = None
    """Key/value heads (GQA); None means num_heads."""
    head_dim: PositiveInt | None = None
    """Per-head width; None means hidden_size // num_heads."""
    max_position_embeddings: PositiveInt = 2048
    """Longest sequence the model is meant for (also the rollout context limit)."""
    rope_theta: PositiveFloat = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """HF rope_scaling dict (`llama3` or `linear`), or None."""
    rms_norm_eps: PositiveFloat = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Output head shares the input embedding."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2 has it)."""
    sliding_window: PositiveInt | None = None
    """Mistral sliding-window attention span, or None for full causal attention."""
    value_head: bool = False
    """Replace the LM head by a scalar head (critic / reward model)."""

    def __post_init__(self):
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        if self.arch not in ARCHITECTURES.values():
            raise ConfigError(f"unsupported architecture {self.arch!r} (supported: {sorted(ARCHITECTURES.values())})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def validate_tp(self, tp: int) -> None:
        """Raise a one-line error when this model cannot be split over tp ranks."""
        if self.num_heads % tp:
            raise ConfigError(f"tensor-parallel size {tp} does not divide num_heads {self.num_heads}")
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ConfigError(f"tensor-parallel size {tp} and num_kv_heads {self.num_kv_heads}: one must divide the other")
        if self.intermediate_size % tp:
            raise ConfigError(f"tensor-parallel size {tp} does not divide intermediate_size {self.intermediate_size}")
        per_rank = -(-self.vocab_size // tp)
        if self.vocab_size - per_rank * (tp - 1) <= 0:
            raise ConfigError(f"vocab {self.vocab_size} is too small to split over {tp} ranks")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or []
        known = {**ARCHITECTURES, **VALUE_ARCHITECTURES}
        names = [a for a in archs if a in known]
        if not names:
            raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r} "
                              f"(supported: {', '.join(known)})")
        arch, value_head = known[names[0]], names[0] in VALUE_ARCHITECTURES
        try:
            sliding = hf.get("sliding_window") if arch == "mistral" or hf.get("use_sliding_window") else None
            return cls(
                arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"), max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(hf), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=arch == "qwen2" or hf.get("attention_bias", False),
                sliding_window=sliding, value_head=value_head,
            )
        except KeyError as e:
            raise ConfigError(f"HF config lacks field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        names = VALUE_ARCHITECTURES if self.value_head else ARCHITECTURES
        cls_name = {v: k for k, v in names.items()}[self.arch]
        out = {
            "architectures": [cls_name], "model_type": self.arch, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        }
        if self.value_head:
            out.update(num_labels=1, pad_token_id=0)
        if self.arch == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            out["use_sliding_window"] = False
        return out


def _rope_scaling(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling")
    if rs is None:  # transformers 5 folds it into rope_parameters
        rp = hf.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default":
            rs = {k: v for k, v in rp.items() if k != "rope_theta"}
    return rs


# ---- the settings every run shares ------------------------------------------------------------------

@dataclass
class ParallelConfig:
    tp: PositiveInt = 1
    """Tensor-parallel size (must divide the number of heads)."""
    pp: PositiveInt = 1
    """Pipeline-parallel size."""
    virtual_stages: PositiveInt = 1
    """Model chunks per pipeline rank (> 1: interleaved 1F1B; micro-batches must divide by pp)."""
    layer_split: list[PositiveInt] | None = None
    """Decoder layers per (virtual) stage, e.g. [1, 3, 2, 2]; None: an even split."""
    schedule: Literal["1f1b", "interleaved"] = "1f1b"
    """Pipeline schedule when pp > 1: 1f1b, or interleaved (set with virtual_stages > 1)."""
    sequence_parallel: bool = False
    """Split the residual stream along the sequence across TP ranks (saves activation memory)."""
    recompute: bool = False
    """Recompute each decoder layer in backward instead of storing its activations."""
    compile: bool = False
    """torch.compile (inductor) each decoder layer for full-sequence passes: fuses the norms, rotary,
    SwiGLU and residual adds (PPO L on 2 CPU cores: ~20% faster scoring and training). The first
    steps pay the compilation."""


@dataclass
class PrecisionSettings:
    """Fields shared by train, rm and ppo (their configs inherit them)."""

    precision: Precision = "fp32"
    """fp32; bf16 (bf16 parameters, fp32 gradients and master weights); fp16 (the same with fp16 and a
    dynamic loss scaler, `loss_scale`); fp8 (bf16 with the decoder's linear GEMMs in FP8, `fp8`). The
    old key `dtype` is still accepted."""
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    """fp16 only: the dynamic loss scaler (initial scale, growth interval, hysteresis, minimum)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """fp8 only: scaling recipe (delayed / current), amax history, margin, backend (te / torch)."""


# ---- YAML + overrides ------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """'--a.b=c' -> (['a','b'], parsed c). Values parse as YAML scalars (1, 1e-3, true, null, [1,2])."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def load_config(cls, path: str | None, overrides: list[str] = ()):
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for ov in overrides:
        keys, value = parse_override(ov)
        if keys == ["dtype"]:  # the old name of `precision`
            keys = ["precision"]
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = value
    if isinstance(data, dict) and "dtype" in data and any(f.name == "precision" for f in dataclasses.fields(cls)):
        data.setdefault("precision", data.pop("dtype"))
    return from_dict(cls, data)


def parse_run_args(cls, argv: list[str], prog: str, description: str, epilog: str | None = None):
    """`--config FILE` plus any `--section.key=value` overrides -> a validated `cls`."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, epilog=epilog,
                                     description=f"{description} Override any config field as --section.key=value.")
    parser.add_argument("--config", help="YAML run config (omitted: the embedded defaults)")
    if any(f.name == "resume" for f in dataclasses.fields(cls)):
        parser.add_argument("--resume", metavar="DIR", help="resume from a checkpoint, a checkpoints directory or "
                                                           "a run directory (its latest checkpoint)")
    args, overrides = parser.parse_known_args(argv)
    if getattr(args, "resume", None):
        overrides = [*overrides, f"--resume={args.resume}"]
    return load_config(cls, args.config, overrides)


def validate(cfg) -> None:
    """Type- and range-check a config built in code (load_config checks as it builds)."""
    check(cfg)


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
