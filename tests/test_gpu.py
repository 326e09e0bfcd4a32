"""Checks that need CUDA (marked `gpu`: skipped where torch sees no GPU; tools/gpu_check.sh runs them).

They use only what the lent GPU machine has (torch, transformers, pytest; no vLLM, no megatron-core):
device-true train steps on cuda under the device guard, NCCL at world size 1, FP8 layers on real FP8
hardware, and Transformer Engine's FP8 layers against trident's on the same weights where TE imports.
"""
import math

import pytest
import torch

from parallel.precision import te_available
from tests.device_guard import DeviceGuard

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def _handle(precision, backend="torch"):
    from engine.build import build_handle
    from engine.checkpoint import RandomSource
    from engine.config import ModelConfig, ParallelConfig, PrecisionSettings
    from parallel.optimizer import OptimConfig
    from parallel.precision import FP8Config
    from parallel.state import ParallelState

    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      max_position_embeddings=128)
    settings = PrecisionSettings(precision=precision, fp8=FP8Config(backend=backend))
    return build_handle(RandomSource(cfg, 0), ParallelState(device=CUDA), ParallelConfig(), settings,
                        OptimConfig(lr=3e-3, warmup_steps=1), 20, ids=lambda mb: mb["input_ids"])


def _batch(seed=0, rows=4, seq=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "position_ids": torch.arange(seq).expand(rows, seq),
            "doc_ids": torch.zeros(rows, seq, dtype=torch.long)}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "fp8"])
def test_train_steps_on_cuda_stay_on_the_device_and_learn(precision):
    from engine.train import train_step
    handle = _handle(precision)
    batch = [_batch(0)]
    losses = []
    for _ in range(8):
        with DeviceGuard(CUDA) as guard:
            losses.append(train_step(handle, batch)["loss"])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    assert guard.syncs <= 4, guard.syncs  # metrics reach the host in a few copies per step, not per op


def test_nccl_world_size_one():
    import os

    import torch.distributed as dist

    from parallel.launch import free_port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        t = torch.ones(4, device=CUDA)
        dist.all_reduce(t, group=dist.group.WORLD)
        dist.barrier()
        assert t.sum().item() == 4
    finally:
        dist.destroy_process_group()


def _sqnr(ref, x):
    ref, x = ref.double(), x.double()
    return 10 * math.log10(ref.square().sum().item() / max((ref - x).square().sum().item(), 1e-30))


def _linear_pair(backend):
    """An FP8 column-parallel layer (TP1) on `backend` and its bf16 twin, same weights."""
    from parallel.fp8 import FP8Group
    from parallel.layers import ColumnParallelLinear
    from parallel.precision import FP8Config, PrecisionPolicy

    torch.manual_seed(0)
    ref = ColumnParallelLinear(256, 512, None, dtype=torch.bfloat16, fp8=True, device=CUDA)
    with torch.no_grad():
        ref.weight.normal_(std=0.05)
    fp8 = ColumnParallelLinear(256, 512, None, dtype=torch.bfloat16, fp8=True, device=CUDA)
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
    policy = PrecisionPolicy("fp8", fp8=FP8Config(backend=backend, recipe="current"), device=CUDA)
    if backend == "te":
        from parallel.te import arm_te_linear
        arm_te_linear(fp8)
    else:
        fp8.fp8_meta = FP8Group(["l"], policy.fp8, CUDA, None, []).meta(0)
    return ref, fp8, policy


def _run(layer, x, g, policy=None):
    x = x.clone().requires_grad_()
    with policy.autocast() if policy is not None else torch.autocast("cuda", enabled=False):
        y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


def test_fp8_linear_on_cuda_reaches_20_db():
    ref, fp8, _ = _linear_pair("torch")
    x = torch.randn(4, 128, 256, device=CUDA, dtype=torch.bfloat16)
    g = torch.randn(4, 128, 512, device=CUDA, dtype=torch.bfloat16) * 1e-3
    for a, b in zip(_run(ref, x, g), _run(fp8, x, g)):
        assert _sqnr(a, b) >= 20


@pytest.mark.skipif(not (torch.cuda.is_available() and te_available(CUDA)), reason="Transformer Engine not installed")
def test_transformer_engine_fp8_matches_trident_fp8_on_the_same_weights():
    ref, ours, _ = _linear_pair("torch")
    _, te_layer, policy = _linear_pair("te")
    x = torch.randn(4, 128, 256, device=CUDA, dtype=torch.bfloat16)
    g = torch.randn(4, 128, 512, device=CUDA, dtype=torch.bfloat16) * 1e-3
    bf16, trident, te = _run(ref, x, g), _run(ours, x, g), _run(te_layer, x, g, policy)
    for a, b, c in zip(bf16, trident, te):
        assert _sqnr(a, c) >= 20 and _sqnr(b, c) >= 20  # TE's FP8 and ours: both near bf16, near each other


@pytest.mark.skipif(not (torch.cuda.is_available() and te_available(CUDA)), reason="Transformer Engine not installed")
def test_transformer_engine_backend_trains():
    from engine.train import train_step
    handle = _handle("fp8", backend="te")
    assert handle.precision.backend == "te" and handle.fp8 is None
    losses = [train_step(handle, [_batch(0)])["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses
