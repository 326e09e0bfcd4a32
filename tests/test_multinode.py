"""PPO with separate rollout engines across torchrun "nodes" (c10d on 127.0.0.1): the weights travel
over the network only, the results come back as tensors; a separate run equals the single-node one,
and a dead or stalled engine ends the run with an error that names it, in bounded time."""
import pytest

from engine.rollout import vllm_available
from tests.multinode import history, run_nodes

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

TIMING = ("_s", "gen_tokens_per_s")


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    from tests.hf_models import save_hf_model
    path = tmp_path_factory.mktemp("actor")
    save_hf_model("llama", path, vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return path


def _args(actor, out, steps=3, *extra):
    return [f"--actor={actor}", "--rollout.backend=vllm", f"--steps={steps}", "--rollout.prompts_per_step=8",
            "--rollout.max_new_tokens=6", "--eval.path=null", "--export_hf=false", "--algo.micro_batch_size=4",
            '--reward.rules={"tests.ppo_rewards:text_length": 1.0}', "--actor_lr=1e-3", "--critic_lr=1e-3",
            f"--out_dir={out}", *extra]


def _untimed(lines):
    return [{k: v for k, v in x.items() if not k.endswith(TIMING)} for x in lines]


def test_separate_engine_on_another_node_equals_one_node(actor, tmp_path):
    """Trainer on one node, the vLLM engine on the other: every number of every step equals the run
    with the engine on the trainer's own rank (shared memory), bit for bit."""
    from tests import train_workers
    from tests.distributed import run_ranks
    one = run_ranks(1, train_workers.ppo_history, _args(actor, tmp_path / "one"), timeout=600, threads=2)[0]
    codes, out, _ = run_nodes(_args(actor, tmp_path / "two", 3, "--rollout.placement=separate"))
    assert codes == [0, 0], out[-3000:]
    assert _untimed(history(tmp_path / "two")) == _untimed(one)


@pytest.mark.parametrize("fault,expect", [
    ({"TRIDENT_CRASH_AT": "engine:generate:2"}, "lost results of rollout engine 0"),
    ({"TRIDENT_STALL_AT": "engine:sync:2"}, "weight transfer to rollout engine 0 failed"),
])
def test_dead_or_stalled_engine_ends_the_run_naming_it(actor, tmp_path, fault, expect):
    codes, out, seconds = run_nodes(_args(actor, tmp_path / "run", 4, "--rollout.placement=separate",
                                          "--rollout.timeout_s=8"),
                                    env={**fault, "TRIDENT_CRASH_RANK": "1"}, timeout=300)
    assert all(c != 0 for c in codes), out[-3000:]
    assert expect in out, out[-3000:]
    assert seconds < 120  # bounded: the engine start (~20 s), two steps, one 8 s timeout
