"""ZeRO-1 (optim.distributed): the sharded optimizer equals plain DDP and one rank, at TP2 x PP2 x DP2
with sequence parallelism (its replica gradients take the all-reduced buckets), with an overlapped
parameter all-gather, under interleaved pipelining, and under bf16, fp8 and fp16 (an overflow step
skipped on every rank although only one rank's shard holds the inf)."""
import pytest
import torch

from parallel.ddp import DistributedDataParallel
from tests.distributed import run_ranks
from tests.zero_workers import canonical, train_variants

FP32 = {"ddp": {"sp": True}, "zero": {"sp": True, "distributed": True},
        "zero_overlap": {"sp": True, "distributed": True, "overlap": True},
        # a tied embedding split across the first and last stages, whose buffers have other layouts
        "tied_ddp": {"tie": True, "sp": True}, "tied_zero": {"tie": True, "sp": True, "distributed": True}}
LOW = {"bf16_ddp": {"precision": "bf16"}, "bf16_zero": {"precision": "bf16", "distributed": True},
       "fp16_ddp": {"precision": "fp16", "inf_step": 2}, "fp16_zero": {"precision": "fp16", "inf_step": 2, "distributed": True},
       "fp8_ddp": {"precision": "fp8"}, "fp8_zero": {"precision": "fp8", "distributed": True}}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    one = train_variants(0, 1, 1, 1, {"ddp": {}, "bf16_ddp": {"precision": "bf16"}}, f"{root}/one", micro=4)
    eight = run_ranks(8, train_variants, 2, 2, {**FP32, **LOW}, f"{root}/eight")
    return root, one, eight


def test_zero1_equals_ddp_and_one_rank_fp32(runs):
    root, one, eight = runs
    ref = canonical(f"{root}/one/ddp")
    ddp, zero = canonical(f"{root}/eight/ddp"), canonical(f"{root}/eight/zero")
    for r in eight:
        assert r["zero"]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-6)
        assert r["zero"]["losses"] == pytest.approx(one["ddp"]["losses"], rel=1e-5)
        assert r["tied_zero"]["losses"] == pytest.approx(r["tied_ddp"]["losses"], rel=1e-6)
        assert r["zero_overlap"] == r["zero"]  # the same arithmetic, only the gather's timing differs
    assert _max_diff(zero, ddp) < 1e-6
    assert _max_diff(canonical(f"{root}/eight/tied_zero"), canonical(f"{root}/eight/tied_ddp")) < 1e-6
    # Adam turns gradient round-off of TP/PP/DP sums into ~lr-relative 1e-3 update differences
    assert _max_diff(zero, ref) < 1e-4 and _max_diff(ddp, ref) < 1e-4
    assert torch.equal(torch.cat([t.flatten() for t in zero.values()]),
                       torch.cat([t.flatten() for t in canonical(f"{root}/eight/zero_overlap").values()]))
    assert _max_diff(zero, canonical(f"{root}/one/ddp")) > 0  # the runs trained (not a copied file)


def test_zero1_bf16_and_fp16_overflow_within_precision(runs):
    root, one, eight = runs
    for r in eight:
        assert r["fp16_zero"]["skipped"] == r["fp16_ddp"]["skipped"] == [False, True, False]
        assert r["fp16_zero"]["steps"] == 2  # the skipped step did not advance the LR schedule
        assert r["fp16_zero"]["losses"] == pytest.approx(r["fp16_ddp"]["losses"], rel=1e-3)
        assert r["bf16_zero"]["losses"] == pytest.approx(r["bf16_ddp"]["losses"], rel=1e-3)
        assert r["fp8_zero"]["losses"] == pytest.approx(r["fp8_ddp"]["losses"], rel=1e-3)
        assert r["bf16_zero"]["losses"] == pytest.approx(one["bf16_ddp"]["losses"], rel=1e-2)
    for name in ("bf16", "fp16", "fp8"):
        zero, ddp = canonical(f"{root}/eight/{name}_zero"), canonical(f"{root}/eight/{name}_ddp")
        assert _max_diff(zero, ddp) < 2e-3, name  # a few low-precision ulps after 3 Adam steps


def test_zero1_interleaved_pipeline_dp2(tmp_path):
    variants = {"ddp": {}, "zero": {"distributed": True}}
    four = run_ranks(4, train_variants, 1, 2, variants, f"{tmp_path}", 3, 2)
    for r in four:
        assert r["zero"]["losses"] == pytest.approx(r["ddp"]["losses"], rel=1e-6)
    assert _max_diff(canonical(f"{tmp_path}/zero"), canonical(f"{tmp_path}/ddp")) < 1e-6


def test_shards_are_aligned_equal_and_cover_every_parameter_once():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 130, 7, 64)]
    for dp in (1, 2, 4):
        covered = {id(p): torch.zeros(p.numel(), dtype=torch.int) for p in params}
        for rank in range(dp):
            ddp = DistributedDataParallel(params, None, bucket_mb=200 * 4 / 1024**2, shard=True)
            ddp.dp, ddp.dp_rank = dp, rank  # the layout only: no communication happens here
            ddp.buckets, ddp.offset = [], {}
            ddp._layout(list(reversed(params)), 0, 200, False)
            for b in ddp.buckets:
                lo, hi = ddp.shard_range(b)
                assert (b.end - b.start) % (dp * 64) == 0 and (hi - lo) * dp == b.end - b.start
            for p, lo, hi in ddp.owned_pieces():
                covered[id(p)][lo:hi] += 1
        assert all(torch.equal(c, torch.ones_like(c)) for c in covered.values()), dp
