"""The shared reshard file with the actor's parameters living in it (no vLLM needed)."""
import pytest

from engine.config import ModelConfig
from tests import reshard_workers
from tests.distributed import run_ranks

CFG = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_tp1_parameters_live_in_the_file_and_a_sync_copies_nothing(dtype):
    out = reshard_workers.shared_file_with_adoption(0, 1, CFG, 1, dtype)
    assert out["moved"] == out["params"] and out["kept"]
    assert out["copied"] == 0 and out["written"] > 0
    assert out["names"] and all(out["same"].values()), [n for n, ok in out["same"].items() if not ok]


def test_tp2_adopts_what_is_contiguous_and_copies_the_rest():
    for rank in run_ranks(2, reshard_workers.shared_file_with_adoption, CFG, 2, "bf16"):
        assert 0 < rank["moved"] < rank["params"] and rank["kept"]  # whole-row blocks move; q/k/v and column blocks do not
        assert 0 < rank["copied"] < rank["written"]
        assert rank["names"] and all(rank["same"].values()), [n for n, ok in rank["same"].items() if not ok]


def test_vllm_cpu_binding_shares_the_cores_and_leaves_the_environment_alone(monkeypatch):
    import os

    from engine.vllm_engine import _env_defaults, cpu_binding
    assert cpu_binding(1, cores=[0, 1]) == "0,1"
    assert cpu_binding(2, cores=[0, 1]) == "0|1"
    assert cpu_binding(2, cores=[0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_binding(4, cores=[0, 1]) == "0|1|0|1"  # fewer cores than ranks: they share
    assert cpu_binding(1, reserve=1, cores=[0, 1]) == "0"  # one core left to vLLM's scheduler
    assert cpu_binding(2, reserve=1, cores=[0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_binding(1, reserve=4, cores=[0, 1]) == "0"  # never fewer than one
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with _env_defaults({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1"}):
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"  # the user's setting wins
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # the next engine (another TP size) sets its own
