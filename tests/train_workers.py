"""Rank functions for multi-rank training tests."""
from engine.config import load_config
from engine.train import TrainConfig, train


def train_losses(rank, world, runs):
    """runs: list of override lists; returns each run's loss curve."""
    return [[m["loss"] for m in train(load_config(TrainConfig, None, overrides))] for overrides in runs]


def ppo_history(rank, world, overrides):
    from engine.ppo import PPOConfig, ppo
    return ppo(load_config(PPOConfig, None, overrides))


def layout_logits(rank, world, ckpt_path, tp, pp):
    """Full logits of a fixed batch from a checkpoint loaded at TP x PP (forward-only pipeline)."""
    import torch

    from engine import checkpoint as ckpt
    from engine.sampler import gather_vocab
    from engine.train import ParallelConfig, activation_shape, build_chunks, forward_backward
    from parallel.state import build_state

    state = build_state(rank, tp, pp, world // (tp * pp), torch.device("cpu"))
    source = ckpt.open_source(ckpt_path)
    par = ParallelConfig(tp=tp, pp=pp)
    chunks = build_chunks(source, source.config, par, state, "fp32")
    ids = torch.randint(4, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def step(model, mb):
        out = model(mb["input_ids"])
        return out, lambda logits: (torch.zeros(()), {"logits": gather_vocab(logits, model)})

    stats = forward_backward(step, chunks, [{"input_ids": ids}], state, par,
                             activation_shape(source.config, state, False), forward_only=True)
    return stats[0]["logits"]
