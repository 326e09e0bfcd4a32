"""What every rollout backend returns (Rollout: responses and their per-token log-probs, also as the
padded tensors they travel and are saved as), and the native backend: the engine's own TP sampler
(engine/sampler.py) on the training weights themselves, so there is nothing to sync."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampler import SamplingParams, generate


@dataclass
class Rollout:
    responses: list[list[int]]
    logprobs: list[list[float]]
    """Log-prob of each sampled token under softmax(logits / temperature) of the generating weights."""

    def to_tensors(self, width: int | None = None) -> dict[str, torch.Tensor]:
        """Rows of tokens padded with -1 and their float32 log-probs: how a batch travels and is saved."""
        width = max((len(r) for r in self.responses), default=0) if width is None else width
        tokens = torch.full((len(self.responses), width), -1, dtype=torch.int64)
        logprobs = torch.zeros(len(self.responses), width, dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(self.responses, self.logprobs)):
            tokens[i, :len(r)], logprobs[i, :len(r)] = torch.tensor(r, dtype=torch.int64), torch.tensor(lp)
        return {"tokens": tokens, "logprobs": logprobs}

    @classmethod
    def from_tensors(cls, tokens: torch.Tensor, logprobs: torch.Tensor) -> "Rollout":
        n = (tokens >= 0).sum(1).tolist()
        return cls([row[:k] for row, k in zip(tokens.tolist(), n)], [row[:k] for row, k in zip(logprobs.tolist(), n)])


class NativeRollout:
    name = "native"

    def __init__(self, model, eos_id: int, pad_id: int):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id

    def sync(self, model) -> float:
        return 0.0  # generates from the training weights themselves

    def push(self, model) -> None:
        pass

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Rollout:
        return Rollout(*generate(self.model, prompts, params, self.eos_id, self.pad_id))

    def close(self) -> None:
        pass
