"""Launch `trident ppo` as several torchrun "nodes" on this host (c10d rendezvous on 127.0.0.1)."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parallel.launch import free_port

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def run_nodes(args: list[str], nodes: int = 2, per_node: int = 1, env: dict | None = None,
              timeout: float = 900) -> tuple[list[int], str, float]:
    """(exit codes, combined output, seconds) of `nodes` torchrun agents running one PPO job."""
    port = free_port()
    cmd = [TORCHRUN, f"--nnodes={nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=trident-{port}", "--max-restarts=0",
           "-m", "engine.cli", "ppo", *args]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.getcwd()}
    t0 = time.perf_counter()
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(nodes)]
    # a session per node: whatever a node leaves behind (vLLM's engine processes of a killed host) is
    # stopped with it below; the exit codes are the agents', not the pipes' (orphans may hold those)
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=full_env,
                              start_new_session=True) for log in logs]
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - t0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
        log.close()
    return [p.returncode for p in procs], "\n".join(out), seconds


def history(out_dir) -> list[dict]:
    return [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


TIMING = ("_s", "gen_tokens_per_s")


def untimed(lines: list[dict]) -> list[dict]:
    """Step lines without their timings (what two equal runs share bit for bit)."""
    return [{k: v for k, v in x.items() if not k.endswith(TIMING)} for x in lines]


def save_tiny_actor(path) -> None:
    from tests.hf_models import save_hf_model
    save_hf_model("llama", path, vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_ppo_args(actor, out, steps: int = 3, *extra: str) -> list[str]:
    """A few PPO steps of the tiny actor with vLLM rollouts and a length reward."""
    return [f"--actor={actor}", "--rollout.backend=vllm", f"--steps={steps}", "--rollout.prompts_per_step=8",
            "--rollout.max_new_tokens=6", "--eval.path=null", "--export_hf=false", "--algo.micro_batch_size=4",
            '--reward.rules={"tests.ppo_rewards:text_length": 1.0}', "--actor_lr=1e-3", "--critic_lr=1e-3",
            f"--out_dir={out}", *extra]

