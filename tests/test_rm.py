"""trident rm through the training handle: TP2 x DP2 and PP2 x DP2 take one rank's steps."""
import pytest

from tests import train_workers
from tests.distributed import run_ranks
from tests.hf_models import save_hf_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    save_hf_model("llama", d, vocab_size=384, max_position_embeddings=64, num_hidden_layers=4)
    return str(d)


def test_rm_at_tp2_dp2_and_pp2_dp2_matches_one_rank(policy, tmp_path):
    """The step's pairs are split over DP ranks (4 micro-batches of 2 pairs in all); losses are means
    over every rank's pairs, accuracy and margin are summed over ranks."""
    base = [f"--init={policy}", "--steps=4", "--batch_pairs=8", "--eval_every=2", "--optim.lr=1e-3",
            "--optim.warmup_steps=1"]
    one = train_workers.rm_history(0, 1, base + ["--micro_batch_pairs=2", f"--out_dir={tmp_path}/one"])
    keys = ["loss", "accuracy", "margin", "grad_norm", "eval_accuracy"]
    for layout in (["--parallel.tp=2"], ["--parallel.pp=2"]):
        four = run_ranks(4, train_workers.rm_history, base + layout + ["--micro_batch_pairs=2",
                                                                       f"--out_dir={tmp_path}/{layout[0][-4:]}"])
        for rank in four:
            for a, b in zip(one, rank):
                for k in keys:
                    if k in a:
                        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (layout, k, a[k], b[k])
    assert one[-1]["loss"] != one[0]["loss"] and "eval_accuracy" in one[1] and one[0]["grad_norm"] > 0
