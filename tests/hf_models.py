"""Tiny random HF models (Llama, Mistral, Qwen2) saved locally, for parity tests."""
from __future__ import annotations

import torch
import transformers

CONFIGS = {
    # vocab 251 divides by neither 2 nor 4; kv heads 2 < tp 4; llama3 rope scaling
    "llama": dict(cls="LlamaForCausalLM", cfg=transformers.LlamaConfig, vocab_size=251, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                  max_position_embeddings=256),
    # one KV head shared by every TP rank
    "mistral": dict(cls="MistralForCausalLM", cfg=transformers.MistralConfig, vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=None, max_position_embeddings=256),
    # qkv bias, tied embeddings
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg=transformers.Qwen2Config, vocab_size=250, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, max_position_embeddings=256),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
    spec = dict(CONFIGS[arch])
    cls, cfg_cls = getattr(transformers, spec.pop("cls")), spec.pop("cfg")
    spec.update(overrides)
    torch.manual_seed(seed)
    config = cfg_cls(**spec, torch_dtype=torch.float32, attn_implementation="eager")
    model = cls(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(arch: str, path, seed: int = 0, **overrides):
    model = make_hf_model(arch, seed, **overrides)
    model.save_pretrained(path)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
