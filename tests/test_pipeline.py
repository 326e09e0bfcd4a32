"""Pipeline schedules on real gloo ranks equal the serial chain: losses and every gradient."""
import pytest
import torch

from parallel.pipeline import Action, interleaved, one_f_one_b, shared
from tests import pipeline_workers as W
from tests.distributed import run_ranks


def test_one_f_one_b_order_has_warmup_steady_cooldown():
    order = one_f_one_b(m=4, pp=4, rank=1)
    assert [(a.kind, a.mb) for a in order] == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1),
                                               ("B", 2), ("B", 3)]
    for rank in range(4):  # every micro-batch once forward, once backward, forward first
        o = one_f_one_b(6, 4, rank)
        assert sorted((a.kind, a.mb) for a in o) == sorted([("F", i) for i in range(6)] + [("B", i) for i in range(6)])
        assert all(o.index(Action("F", i)) < o.index(Action("B", i)) for i in range(6))


def test_interleaved_and_shared_orders_cover_every_action():
    for rank in range(2):
        o = interleaved(4, 2, rank, v=2)
        assert sorted((a.kind, a.mb, a.chunk) for a in o) == sorted(
            (k, i, c) for k in "FB" for i in range(4) for c in range(2))
        s = shared(4, 2, rank)
        assert sorted((a.kind, a.mb, a.model) for a in s) == sorted(
            (k, i, m) for k in "FB" for i in range(4) for m in range(2))


@pytest.mark.parametrize("world,schedule,v,split,models", [
    (2, "1f1b", 1, None, 1),
    (4, "1f1b", 1, [1, 3, 2, 2], 1),   # uneven split
    (2, "interleaved", 2, None, 1),    # 2 virtual stages per rank
    (2, "shared", 1, None, 2),         # two models in one schedule
])
def test_pipeline_equals_serial(world, schedule, v, split, models):
    ref = W.serial(models=models)
    ranks = run_ranks(world, W.pipelined, schedule, v, split, models)
    for k in range(models):
        grads = {}
        for r in ranks:
            grads.update(r[k][0])
        assert grads.keys() == ref[k][0].keys()
        for name, g in ref[k][0].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
        for r in ranks:  # every stage reports the last stage's losses
            assert r[k][1] == pytest.approx(ref[k][1], rel=1e-5)


def test_simulated_schedules_hit_their_textbook_step_times():
    from tools.bench_pipeline import simulate
    from parallel.pipeline import build_order
    p, m, v, f, b = 4, 8, 2, 1.0, 2.0
    t = f + b
    assert simulate([one_f_one_b(m, p, r) for r in range(p)], p, 1, f, b) == pytest.approx((m + p - 1) * t)
    assert simulate([build_order("interleaved", m, p, r, v) for r in range(p)], p, v, f, b) == \
        pytest.approx((m + (p - 1) / v) * t)
    assert simulate([shared(m, p, r) for r in range(p)], p, 1, f, b) == pytest.approx((2 * m + p - 1) * t)


def test_bench_pipeline_cli_reports_every_schedule(capsys):
    import json
    from tools.bench import main
    assert main(["pipeline", "--stages", "2", "--micro-batches", "4", "--forward-ms", "5", "--backward-ms", "10"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["bubble"]) == {"1f1b", "interleaved", "shared"}
    assert res["shared_units"] < res["sequential_units"]


def test_ddp_reduces_buckets_from_backward_hooks_and_sums_over_ranks():
    ranks = run_ranks(2, W.ddp_buckets)
    for early, started, n_buckets, _ in ranks:
        assert not early and n_buckets > 1 and all(started)
    # reference: each rank's two micro-batches on one process, gradients summed
    total = {}
    for seed in range(2):
        chain = W.Chunk(range(W.BLOCKS))
        for mb in W.micro_batches(seed=seed)[:2]:
            out, loss_fn = W.forward_step(chain, mb)
            loss_fn(out)[0].backward()
        for n, p in chain.named_parameters():
            total[n] = total.get(n, 0) + p.grad
    for _, _, _, grads in ranks:
        for n, g in grads.items():
            torch.testing.assert_close(g, total[n], rtol=1e-5, atol=1e-6)
