"""Rank functions for sampler tests."""
import torch

from engine.checkpoint import HFSource, load_into
from engine.model import Transformer
from engine.sampler import SamplingParams, generate
from parallel.state import build_state


def generate_at_tp(rank, world, hf_dir, prompts, params_kwargs, eos, pad, sp):
    state = build_state(rank, world, 1, 1, torch.device("cpu"))
    src = HFSource(hf_dir)
    model = Transformer(src.config, state, sequence_parallel=sp)
    load_into(model, src)
    return generate(model, prompts, SamplingParams(**params_kwargs), eos, pad)
