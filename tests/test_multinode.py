"""PPO with separate rollout engines across torchrun "nodes" (c10d on 127.0.0.1): a stalled engine ends
the run with an error that names it, in bounded time (a separate run equals the single-node one:
tests/test_vllm_rollout.py; a dead engine: tests/test_ray.py)."""
import pytest

from engine.rollout import vllm_available
from tests.multinode import run_nodes, tiny_ppo_args as _args

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]


def test_stalled_engine_ends_the_run_naming_it(vllm_actor, tmp_path):
    """The engine hangs before its second weight sync: the trainer's wait for that sync times out naming
    it (its workers posted their receives ahead, so the bytes themselves went through), and the hung
    engine's watchdog ends its node too (a dead engine: tests/test_ray.py)."""
    fault, expect = {"TRIDENT_STALL_AT": "engine:sync:2"}, "rollout engine 0's weight sync"
    codes, out, seconds = run_nodes(_args(vllm_actor, tmp_path / "run", 4, "--rollout.placement=separate",
                                          "--rollout.timeout_s=8"),
                                    env={**fault, "TRIDENT_CRASH_RANK": "1"}, timeout=300)
    assert all(c != 0 for c in codes), out[-3000:]
    assert expect in out, out[-3000:]
    assert seconds < 120  # bounded: the engine start (~20 s), two steps, one 8 s timeout
