"""How a Llama-family model's canonical (HF-named) tensors map onto one rank's parameters.

This is the single source of truth for sharding: checkpoint conversion, native save/load and model
initialisation all walk the same list, so "parallel == serial" holds by construction. A spec says:
rows `rows` of parameter `param` hold the slice [start, start+length) along `dim` of the canonical
tensor `name` (dim None: the whole tensor, replicated across TP).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig


@dataclass(frozen=True)
class ShardSpec:
    name: str
    """Canonical (HF) tensor name."""
    shape: tuple[int, ...]
    """Global shape of the canonical tensor."""
    dim: int | None
    """Dimension it is split along across TP ranks, None when replicated."""
    start: int
    length: int
    param: str
    """Name of the engine parameter holding the slice."""
    rows: tuple[int, int] | None
    """Row range [a, b) of that parameter the slice fills; None for the whole parameter."""
    owner: bool
    """This rank writes the slice (replicated slices are written by one rank only)."""


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(KV heads held per rank, how many ranks share each KV head)."""
    if cfg.num_kv_heads >= tp:
        return cfg.num_kv_heads // tp, 1
    return 1, tp // cfg.num_kv_heads


def vocab_slice(cfg: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int, int]:
    """(padded rows per rank, first token id of this rank, real rows on this rank)."""
    per_rank = -(-cfg.vocab_size // tp)
    start = tp_rank * per_rank
    return per_rank, start, max(0, min(per_rank, cfg.vocab_size - start))


def shard_layout(cfg: ModelConfig, tp: int, tp_rank: int, layers: range,
                 first_stage: bool = True, last_stage: bool = True) -> list[ShardSpec]:
    H, hd, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_local = cfg.num_heads // tp * hd
    kv_local_heads, kv_share = kv_heads_per_rank(cfg, tp)
    kv_local = kv_local_heads * hd
    kv_start = (tp_rank // kv_share) * kv_local
    kv_owner = tp_rank % kv_share == 0
    f_local = F // tp
    specs: list[ShardSpec] = []

    def add(name, shape, dim, start, length, param, rows=None, owner=True):
        specs.append(ShardSpec(name, tuple(shape), dim, start, length, param, rows, owner))

    def vocab_matrix(name, param):
        per_rank, start, real = vocab_slice(cfg, tp, tp_rank)
        add(name, (cfg.vocab_size, H), 0, start, real, param, (0, real))

    if first_stage:
        vocab_matrix("model.embed_tokens.weight", "embed.weight")
    for i in layers:
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        add(hf + "input_layernorm.weight", (H,), None, 0, H, me + "input_norm.weight", owner=tp_rank == 0)
        kinds = ["weight", "bias"] if cfg.attention_bias else ["weight"]
        for kind in kinds:
            tail = (H,) if kind == "weight" else ()
            param = me + "attn.qkv." + kind
            add(hf + "self_attn.q_proj." + kind, (cfg.num_heads * hd, *tail), 0, tp_rank * q_local, q_local,
                param, (0, q_local))
            for j, proj in enumerate(("k_proj", "v_proj")):
                a = q_local + j * kv_local
                add(hf + f"self_attn.{proj}." + kind, (cfg.num_kv_heads * hd, *tail), 0, kv_start, kv_local,
                    param, (a, a + kv_local), owner=kv_owner)
        add(hf + "self_attn.o_proj.weight", (H, cfg.num_heads * hd), 1, tp_rank * q_local, q_local,
            me + "attn.o_proj.weight")
        add(hf + "post_attention_layernorm.weight", (H,), None, 0, H, me + "post_norm.weight", owner=tp_rank == 0)
        add(hf + "mlp.gate_proj.weight", (F, H), 0, tp_rank * f_local, f_local, me + "mlp.gate_up.weight", (0, f_local))
        add(hf + "mlp.up_proj.weight", (F, H), 0, tp_rank * f_local, f_local, me + "mlp.gate_up.weight",
            (f_local, 2 * f_local))
        add(hf + "mlp.down_proj.weight", (H, F), 1, tp_rank * f_local, f_local, me + "mlp.down.weight")
    if last_stage:
        add("model.norm.weight", (H,), None, 0, H, "norm.weight", owner=tp_rank == 0)
        if cfg.value_head:
            add("score.weight", (1, H), None, 0, 1, "value_head.weight", owner=tp_rank == 0)
        elif not cfg.tie_word_embeddings:
            vocab_matrix("lm_head.weight", "head.weight")
        elif not first_stage:  # the last stage's copy of a tied embedding: loaded, never written
            per_rank, start, real = vocab_slice(cfg, tp, tp_rank)
            add("model.embed_tokens.weight", (cfg.vocab_size, H), 0, start, real, "head.weight", (0, real),
                owner=False)
    return specs


def canonical_names(cfg: ModelConfig) -> list[str]:
    """Every tensor of the full model in HF order (what an HF export contains)."""
    return [s.name for s in shard_layout(cfg, 1, 0, range(cfg.num_layers))]
