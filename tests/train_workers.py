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
    from engine.build import build_handle
    from engine.config import ParallelConfig, PrecisionSettings
    from engine.sampler import gather_vocab
    from parallel.state import build_state

    state = build_state(rank, tp, pp, world // (tp * pp), torch.device("cpu"))
    source = ckpt.open_source(ckpt_path)
    handle = build_handle(source, state, ParallelConfig(tp=tp, pp=pp), PrecisionSettings(), None,
                          ids=lambda mb: mb["input_ids"])
    ids = torch.randint(4, source.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def step(model, mb):
        out = model(mb["input_ids"])
        return out, lambda logits: (torch.zeros(()), {"logits": gather_vocab(logits, model)})

    return handle.score(step, [{"input_ids": ids}])[0]["logits"]


def rm_history(rank, world, overrides):
    from engine.rm import RMConfig, train_rm
    return train_rm(load_config(RMConfig, None, overrides))


def dpo_history(rank, world, overrides):
    from engine.dpo import DPOConfig, train_dpo
    return train_dpo(load_config(DPOConfig, None, overrides))
