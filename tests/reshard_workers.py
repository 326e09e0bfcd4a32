"""Spawn target: a TP2 x PP2 actor resharded into vLLM (TP 1 or 2) on the same host."""
import torch

from engine.checkpoint import RandomSource, load_into
from engine.rollout import VLLMRollout
from engine.sampler import SamplingParams
from engine.train import ParallelConfig, build_chunks
from parallel.state import build_state


def vllm_greedy_after_reshard(rank, world, cfg, prompts, tp_gen):
    state = build_state(rank, 2, 2, world // 4, torch.device("cpu"))
    chunks = build_chunks(RandomSource(cfg, seed=0), cfg, ParallelConfig(tp=2, pp=2), state, "fp32")
    vllm = VLLMRollout(chunks, 2, max_model_len=cfg.max_position_embeddings, tp_gen=tp_gen)
    try:
        for c in chunks:  # an "update": new weights everywhere, then the in-place sync
            load_into(c, RandomSource(cfg, seed=1))
        vllm.sync(chunks)
        out = vllm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
        return {"responses": out.responses, "bytes": vllm.last_sync_bytes, "model_bytes": vllm.target.model_bytes()}
    finally:
        vllm.close()
