"""The training handle's full training state: saved mid-run and loaded into a fresh handle, the run
continues exactly as if uninterrupted (weights, fp32 masters, Adam moments and step, LR position,
loss scaler, FP8 scaling history). And every config field documents itself."""
import ast
import inspect

import pytest
import torch

from engine.build import build_handle
from engine.checkpoint import RandomSource
from engine.config import ModelConfig, ParallelConfig, PrecisionSettings
from engine.train import train_step
from parallel.optimizer import OptimConfig
from parallel.precision import FP8Config, LossScaleConfig
from parallel.state import ParallelState

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  max_position_embeddings=64)


def _batch(step, rows=2, seq=16):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, CFG.vocab_size, (rows, seq + 1), generator=g)
    return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq).expand(rows, seq),
             "doc_ids": torch.zeros(rows, seq, dtype=torch.long)}]


def _handle(precision):
    settings = PrecisionSettings(precision=precision, loss_scale=LossScaleConfig(initial=2.0 ** 10, growth_interval=2),
                                 fp8=FP8Config(recipe="delayed", amax_history=3))
    return build_handle(RandomSource(CFG, 0), ParallelState(), ParallelConfig(), settings,
                        OptimConfig(lr=1e-2, warmup_steps=3), 8, ids=lambda mb: mb["input_ids"])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "fp8"])
def test_state_dict_resumes_exactly(precision):
    a = _handle(precision)
    for step in range(3):
        train_step(a, _batch(step))
    saved = {k: v for k, v in a.state_dict().items()}
    saved = {**saved, "model": {n: t.clone() for n, t in saved["model"].items()}}
    if "optimizer" in saved:
        saved["optimizer"] = {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v.clone())
                              for k, v in saved["optimizer"].items()}
    if "fp8" in saved:
        assert saved["fp8"]["started"] and saved["fp8"]["history"].abs().sum() > 0
    if "loss_scaler" in saved:
        assert saved["loss_scaler"]["scale"] == 2.0 ** 11  # grew once after two clean steps
    rest = [train_step(a, _batch(step)) for step in range(3, 5)]
    b = _handle(precision)
    b.load_state_dict(saved)
    again = [train_step(b, _batch(step)) for step in range(3, 5)]
    for x, y in zip(rest, again):
        assert x == y
    for (n, p), (_, q) in zip(a.named, b.named):
        assert torch.equal(p, q), n
    assert b.steps == a.steps == 5


def _field_docstrings(cls) -> set[str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    documented = set()
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            documented.add(node.target.id)
    return documented


def test_every_config_field_has_a_docstring():
    import dataclasses

    from engine.dpo import DPOConfig
    from engine.ppo_config import AlgoConfig, EvalConfig, PPOConfig, RolloutConfig
    from engine.reward import RewardConfig
    from engine.rm import PairSettings, RMConfig
    from engine.train import DataConfig, TrainConfig
    from engine.train_state import CheckpointConfig
    classes = [ModelConfig, ParallelConfig, PrecisionSettings, OptimConfig, LossScaleConfig, FP8Config, DataConfig,
               TrainConfig, RMConfig, DPOConfig, PPOConfig, AlgoConfig, RolloutConfig, EvalConfig, RewardConfig,
               CheckpointConfig, PairSettings]
    for cls in classes:
        own = {f.name for f in dataclasses.fields(cls)} - {f.name for base in cls.__mro__[1:]
                                                           if dataclasses.is_dataclass(base)
                                                           for f in dataclasses.fields(base)}
        missing = own - _field_docstrings(cls)
        assert not missing, f"{cls.__name__}: no docstring for {sorted(missing)}"


def test_the_unrelated_pypi_apex_is_not_taken_for_nvidia_apex(monkeypatch, tmp_path):
    """PyPI's `apex` (a web toolkit) has no apex.optimizers: the optimizer and RMSNorm stay on torch."""
    import sys

    from kernels.apex import nvidia_apex
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("'''an unrelated package that happens to be called apex'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    nvidia_apex.cache_clear()
    try:
        assert nvidia_apex() is None
        handle = _handle("bf16")
        assert handle.optimizer.apex is None
    finally:
        nvidia_apex.cache_clear()
