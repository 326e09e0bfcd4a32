"""Launching as users do: two torchrun "nodes" joined by a c10d rendezvous run one TP2 x PP2 x DP2
training; a rank killed mid-step brings every other rank down with an error instead of a hang."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.config import load_config
from engine.train import TrainConfig, train
from parallel.launch import free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--micro_batch_size=2", "--data.seq_len=32", "--model.hidden_size=64", "--model.intermediate_size=160",
         "--model.num_layers=4", "--model.num_heads=4", "--model.num_kv_heads=2", "--optim.warmup_steps=1"]


def _torchrun(nnodes: int, node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"trident-test-{port}", "-m", "engine.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_two_node_torchrun_runs_tp2_pp2_dp2_like_one_rank(tmp_path):
    args = MODEL + ["--steps=2", "--grad_accum=2", "--parallel.tp=2", "--parallel.pp=2"]
    port = free_port()
    nodes = [_torchrun(2, r, port, args + [f"--out_dir={tmp_path}/run"]) for r in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref = [m["loss"] for m in train(load_config(TrainConfig, None, MODEL + [
        "--steps=2", "--grad_accum=4", f"--out_dir={tmp_path}/ref"]))]
    assert losses == pytest.approx(ref, rel=1e-5)


def test_a_dead_rank_stops_every_other_rank_with_an_error(tmp_path):
    import psutil

    args = MODEL + ["--steps=100000", "--grad_accum=2", "--parallel.tp=2", "--parallel.pp=2",
                    f"--out_dir={tmp_path}/run", "--save=false"]
    proc = _torchrun(1, 0, free_port(), args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    assert metrics.is_file(), "training never started"
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "engine.cli" in " ".join(c.cmdline())]
    victim = next(w for w in workers if w.environ().get("RANK") == "3")
    victim.send_signal(signal.SIGKILL)
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert "Signal 9" in err or "SIGKILL" in err or "exitcode" in err, err[-2000:]
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_freeze_heap_takes_set_up_objects_out_of_full_collections():
    import gc

    from parallel.state import freeze_heap

    before = gc.get_freeze_count()
    try:
        set_up = [[] for _ in range(1000)]  # lists are GC-tracked
        freeze_heap()
        assert gc.get_freeze_count() >= before + len(set_up)
    finally:
        gc.unfreeze()


def _priorities() -> list[str]:
    """This process's autogroup nice ("none" where the kernel shows no autogroup, as in a cpu cgroup
    or with autogroup off) and its own nice."""
    try:
        shown = open("/proc/self/autogroup").read().split()
    except OSError:
        shown = []
    return [shown[-1] if shown else "none", str(os.getpriority(os.PRIO_PROCESS, 0))]


def test_a_separate_engine_rank_lowers_itself_and_its_own_session_only():
    """An engine rank goes to nice 19; one that leads its session (as torchrun starts every rank) also
    puts the session's autogroup there, where the kernel shows one; a rank inside another's session
    (spawned by a harness whose session holds the trainers) leaves that session alone."""
    probe = ("import os; from engine.engine_ranks import yield_cpu_to_trainers; from tests.test_launch import _priorities; "
             "print(yield_cpu_to_trainers(), *_priorities(), os.getsid(0) == os.getpid())")

    def run(new_session, code=probe):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                             start_new_session=new_session, env={**os.environ, "PYTHONPATH": ROOT})
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    before = _priorities()
    # A fresh session gets an autogroup of its own even where this one shows none (the CI machine's
    # harness runs in the root group, which the kernel does not show), so ask one first.
    fresh = run(True, "from tests.test_launch import _priorities; print(_priorities()[0])")
    autogroup = "none" if fresh == ["none"] else "19"
    assert run(True) == ["True", autogroup, "19", "True"]
    assert run(False) == ["True", before[0], "19", "False"]
    assert _priorities() == before


def _rank_sees(rank, world):
    return os.environ.get("TRIDENT_LAUNCH_PROBE"), "HOME" in os.environ, os.getcwd(), int(os.environ["RANK"])


def test_local_ranks_see_this_process_environment_and_directory_as_they_are_now(monkeypatch, tmp_path):
    """run_ranks forks its ranks from a server started on the first call (torch imported once); a rank
    still gets the caller's environment and directory as they are at this call, as a spawned one did."""
    from parallel.launch import run_ranks
    run_ranks(1, _rank_sees)  # the server is up, with the environment as it was
    monkeypatch.setenv("TRIDENT_LAUNCH_PROBE", "set after the server started")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run_ranks(2, _rank_sees) == [("set after the server started", False, str(tmp_path), r) for r in (0, 1)]
