"""Llama-family decoder (Llama, Mistral, Qwen2) built from tensor-parallel layers.

Activations are [batch, seq, hidden]; under sequence parallelism the residual stream between blocks
is split along seq across TP ranks. The LM head returns this rank's vocab slice of the logits
(never gathered); `value_head` models return one scalar per token instead. Parameters and buffers live
on the ParallelState's device. The decoder layers' linear GEMMs are FP8-capable (an fp8 precision
policy runs them in FP8); embedding, heads, norms and attention stay in the parameter dtype.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import ModelConfig
from engine.layout import ShardSpec, kv_heads_per_rank, shard_layout, vocab_slice
from kernels.attention import attention_at_positions, native_kernel_available, scaled_dot_product_attention
from kernels.rmsnorm import RMSNorm
from kernels.rope import apply_rope, inv_frequencies, rope_cos_sin
from kernels.swiglu import swiglu
from parallel import comm
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, mark_replica
from parallel.state import ParallelState


def _norm(cfg: ModelConfig, state: ParallelState, sp: bool, dtype) -> RMSNorm:
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=state.device)
    # Under SP each rank normalises its own tokens, so its weight gradient is a partial sum.
    mark_replica(norm.weight, state.tp_group, grads_partial=sp)
    return norm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, sp: bool, dtype):
        super().__init__()
        tp, hd = state.tp, cfg.head_dim
        self.n_q = cfg.num_heads // tp
        self.n_kv, kv_share = kv_heads_per_rank(cfg, tp)
        self.hd, self.sliding_window = hd, cfg.sliding_window
        q_rows, kv_rows = self.n_q * hd, self.n_kv * hd
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 0, state.tp_group, bias=cfg.attention_bias,
                                        sequence_parallel=sp, local_out_features=q_rows + 2 * kv_rows, dtype=dtype,
                                        fp8=True, device=state.device)
        if kv_share > 1:
            # Fewer KV heads than TP ranks: neighbouring ranks hold the same KV head and each sees only
            # its own queries' share of its gradient.
            groups = [state.tp_subgroup(tuple(range(j * kv_share, (j + 1) * kv_share)))
                      for j in range(cfg.num_kv_heads)]
            group = groups[state.tp_rank // kv_share]
            for p in (self.qkv.weight, self.qkv.bias):
                if p is not None:
                    mark_replica(p, group, grads_partial=True, row_start=q_rows)
        self.o_proj = RowParallelLinear(cfg.num_heads * hd, cfg.hidden_size, state.tp_group,
                                        sequence_parallel=sp, dtype=dtype, fp8=True, device=state.device)

    def forward(self, x, cos, sin, mask, cache=None, rows=None):
        """rows ([b, r] positions, causal self-attention only): the output at those positions only."""
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.n_q * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, s, self.n_q, self.hd).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if rows is not None:  # keys and values of every position, queries of the chosen ones
            q = q.gather(2, rows[:, None, :, None].expand(-1, self.n_q, -1, self.hd))
            out = attention_at_positions(q, k, v, rows, enable_gqa=self.n_q != self.n_kv)
            return self.o_proj(out.transpose(1, 2).reshape(b, rows.shape[1], self.n_q * self.hd))
        if cache is not None:  # generation: attend over everything cached so far (mask given by caller)
            k, v = cache.append(k, v)
        if mask is None and self.sliding_window and s > self.sliding_window:
            i = torch.arange(s, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.sliding_window)
        # blocked causal kernel for long unmasked training sequences; torch's SDPA otherwise
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_q != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_q * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, sp: bool, dtype):
        super().__init__()
        f_local = cfg.intermediate_size // state.tp
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 0, state.tp_group, sequence_parallel=sp,
                                            local_out_features=2 * f_local, dtype=dtype, fp8=True, device=state.device)
        self.down = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, state.tp_group,
                                      sequence_parallel=sp, dtype=dtype, fp8=True, device=state.device)

    def forward(self, x):
        return self.down(swiglu(self.gate_up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, state: ParallelState, sp: bool, dtype):
        super().__init__()
        self.input_norm = _norm(cfg, state, sp, dtype)
        self.attn = Attention(cfg, state, sp, dtype)
        self.post_norm = _norm(cfg, state, sp, dtype)
        self.mlp = MLP(cfg, state, sp, dtype)

    def forward(self, x, cos, sin, mask, cache=None, rows=None):
        """rows ([b, r] positions): compute the layer's output at those positions only (a last layer
        whose other outputs nobody reads); keys and values still come from every position."""
        a = self.attn(self.input_norm(x), cos, sin, mask, cache, rows)
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        x = x + a
        return x + self.mlp(self.post_norm(x))


class Transformer(nn.Module):
    """One pipeline stage of the decoder (the whole model when pp == 1).

    layers: global indices of the decoder layers this stage holds; parameter names use global
    indices so checkpoints do not depend on the pipeline split.
    """

    def __init__(self, cfg: ModelConfig, state: ParallelState, *, sequence_parallel: bool = False,
                 recompute: bool = False, dtype: torch.dtype = torch.float32, layers: range | None = None):
        super().__init__()
        cfg.validate_tp(state.tp)
        self.cfg, self.state, self.recompute = cfg, state, recompute
        self.sp = sequence_parallel and state.tp > 1
        self.layer_ids = layers if layers is not None else range(cfg.num_layers)
        self.first, self.last = self.layer_ids.start == 0, self.layer_ids.stop == cfg.num_layers
        group = state.tp_group
        if self.first:
            self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group, self.sp, dtype, state.device)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, state, self.sp, dtype) for i in self.layer_ids})
        self.register_buffer("inv_freq", inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(state.device),
                             persistent=False)
        if self.last:
            self.norm = _norm(cfg, state, self.sp, dtype)
            if cfg.value_head:
                self.value_head = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=state.device)
                mark_replica(self.value_head.weight, group)
            else:
                self.head = ColumnParallelLinear(cfg.hidden_size, 0, group, sequence_parallel=self.sp,
                                                 local_out_features=vocab_slice(cfg, state.tp, 0)[0], dtype=dtype,
                                                 skip_weight_param_allocation=cfg.tie_word_embeddings and self.first,
                                                 device=state.device)
        if cfg.tie_word_embeddings and not cfg.value_head and self.first != self.last:
            # a tied embedding split across stages: the last stage keeps its own copy; the two copies'
            # gradients are summed over the embedding group so they stay equal
            mark_replica(self.embed.weight if self.first else self.head.weight, state.embed_group, grads_partial=True)
        _, self.vocab_start, self.vocab_real = vocab_slice(cfg, state.tp, state.tp_rank)
        self._input_tensor = None
        self._compiled_layers = None

    def compile_layers(self) -> None:
        """Run each decoder layer through torch.compile in full-sequence passes (training, scoring);
        incremental decoding with a KV cache keeps the eager layers. The compiled wrappers share the
        layers' parameters and are not submodules (state dicts are unchanged)."""
        native_kernel_available()  # build / load the C++ attention now, not inside dynamo's trace
        self._compiled_layers = [torch.compile(layer) for layer in self.layers.values()]

    def set_input_tensor(self, hidden: torch.Tensor) -> None:
        """The activation from the previous pipeline stage (the schedule sets it before each forward)."""
        self._input_tensor = hidden

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def shard_specs(self) -> list[ShardSpec]:
        return shard_layout(self.cfg, self.state.tp, self.state.tp_rank, self.layer_ids, self.first, self.last)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                kv_cache=None, select: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s] on the first stage (else `hidden` from the previous stage).

        attention_mask: bool [b, 1, s, s], True where attention is allowed; None means causal.
        kv_cache: a sampler.KVCache for incremental decoding (positions and mask then required).
        select: [b, r] sequence positions whose outputs are wanted (last stage; e.g. the positions that
        predict response tokens): the final norm and the head run on those rows only.
        Returns local logits [b, s or r, vocab slice] (unpadded), values [b, s or r], or the hidden
        state for the next stage.
        """
        if self.first:
            hidden = self.embed(input_ids)
        elif hidden is None:
            hidden = self._input_tensor
        b = hidden.shape[0]
        s = hidden.shape[1] * (self.state.tp if self.sp else 1)
        if position_ids is None:
            position_ids = torch.arange(s, device=hidden.device).expand(b, s)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, hidden.dtype)
        layers = list(self.layers.values())
        if self._compiled_layers is not None and kv_cache is None:
            layers = self._compiled_layers
        # Only the selected rows of the last layer reach the head: that layer computes its queries,
        # attention output and MLP there alone (keys and values still for every position). Causal
        # self-attention only; with SP the rows are split across ranks until the head gathers them.
        rows_only = (select is not None and self.last and len(layers) > 0 and not self.sp and kv_cache is None
                     and attention_mask is None and not (self.cfg.sliding_window and s > self.cfg.sliding_window))
        for i, layer in enumerate(layers):
            rows = select if rows_only and i == len(layers) - 1 else None
            if kv_cache is not None:
                hidden = layer(hidden, cos, sin, attention_mask, kv_cache.layer(i))
            elif self.recompute and self.training:
                hidden = checkpoint(layer, hidden, cos, sin, attention_mask, None, rows, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, attention_mask, None, rows)
        if kv_cache is not None:
            kv_cache.advance(hidden.shape[1])
        if not self.last:
            return hidden
        if select is not None and not self.sp and not rows_only:
            hidden = hidden.gather(1, select[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = self.norm(hidden)
        if self.cfg.value_head:
            if self.sp:
                hidden = comm.gather_from_sequence_parallel_region(hidden, self.state.tp_group, False)
            out = self.value_head(hidden).squeeze(-1)
        else:
            weight = self.embed.weight if self.cfg.tie_word_embeddings and self.first else self.head.weight
            # Padded vocab rows never reach the logits, so losses need no masking.
            out = self.head(hidden, weight[: self.vocab_real])
        if select is not None and self.sp:  # the sequence is split across ranks until the head gathers it
            out = out.gather(1, select if out.dim() == 2 else select[..., None].expand(-1, -1, out.shape[-1]))
        return out
