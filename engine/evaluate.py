"""Held-out accuracy of a checkpoint: greedy answers from the engine's own sampler (fp32 weights, so
checkpoints trained at different precisions are graded alike), scored by reward rules as PPO's
evaluation does (a response counts when every rule gives it >= 1).

  python -m engine.evaluate runs/demo_sft/checkpoint [more checkpoints ...]
"""
import torch

from engine import checkpoint as ckpt
from engine.model import Transformer
from engine.data import load_prompts
from engine.reward import rule_scores
from engine.sampler import SamplingParams, generate
from engine.tokenizer import load_tokenizer
from parallel.state import ParallelState


def held_out_accuracy(path, eval_path: str = "data/arith_eval.jsonl", rules: dict | None = None, limit: int = 200,
                      max_new_tokens: int = 8, tokenizer_path: str | None = None) -> float:
    source = ckpt.open_source(path)
    tokenizer = load_tokenizer(tokenizer_path or str(path))
    model = Transformer(source.config, ParallelState())
    ckpt.load_into(model, source)
    records, ids, _ = load_prompts(eval_path, tokenizer, source.config.max_position_embeddings - max_new_tokens)
    records, ids = records[:limit], ids[:limit]
    responses, _ = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
                            tokenizer.eos_id, tokenizer.pad_id)
    texts = [tokenizer.decode(r) for r in responses]
    scores, valid = rule_scores(rules or {"arith": 1.0}, [r["prompt"] for r in records], texts, records)
    return float(((scores >= 1.0) & valid).float().mean())


if __name__ == "__main__":
    import sys
    torch.set_num_threads(2)
    for p in sys.argv[1:]:
        print(p, held_out_accuracy(p))
