"""`trident ppo --launcher ray`: every rank a Ray actor on a local Ray cluster, placed in the placement
group of its role, running the same code torchrun runs; a killed actor ends the run naming it."""
import os
import subprocess
import sys
import time

import pytest

from engine.rollout import vllm_available
from tests.multinode import tiny_ppo_args

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

RAY = ["--rollout.placement=separate", "--launcher=ray", "--ranks=2"]


def trident(args, env=None, timeout=600):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "ppo", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})})
    return proc, time.perf_counter() - t0


def test_a_killed_ray_actor_ends_the_run_naming_it(vllm_actor, tmp_path):
    """A trainer actor and a separate engine actor (the demo's gain under Ray is tests/test_demo.py's
    async test); the engine actor SIGKILLed at its second generation ends the run, exit code non-zero,
    with an error naming its rank and role, and leaves no vLLM process behind."""
    import psutil
    proc, seconds = trident(tiny_ppo_args(vllm_actor, tmp_path / "killed", 4, *RAY),
                            env={"TRIDENT_CRASH_AT": "engine:generate:2", "TRIDENT_CRASH_RANK": "1"})
    assert proc.returncode != 0
    assert "rank 1 (rollout) died" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 180
    time.sleep(3)  # the guardian polls once a second
    assert not [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("VLLM::")]
