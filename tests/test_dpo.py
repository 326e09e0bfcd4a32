"""trident dpo: the loss against its definition, TP2 x DP2 and PP2 x DP2 equal to one rank, bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine.cli import main
from engine.dpo import dpo_loss
from tests import train_workers
from tests.distributed import run_ranks
from tests.hf_models import save_hf_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    save_hf_model("llama", d, vocab_size=384, max_position_embeddings=64, num_hidden_layers=4)
    return str(d)


def test_dpo_loss_matches_the_papers_formulas():
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(10, generator=g) * 20, -torch.rand(10, generator=g) * 20
    beta, eps = 0.3, 0.1
    loss, chosen, rejected = dpo_loss(logp, ref, beta, "sigmoid", eps)
    for i in range(5):
        h = (logp[i] - logp[5 + i]) - (ref[i] - ref[5 + i])
        expect = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        assert loss[i].item() == pytest.approx(expect.item(), rel=1e-5)
        assert chosen[i].item() == pytest.approx(beta * (logp[i] - ref[i]).item(), rel=1e-5)
        assert rejected[i].item() == pytest.approx(beta * (logp[5 + i] - ref[5 + i]).item(), rel=1e-5)
    ipo, _, _ = dpo_loss(logp, ref, beta, "ipo")
    h = (logp[:5] - logp[5:]) - (ref[:5] - ref[5:])
    torch.testing.assert_close(ipo, (h - 1 / (2 * beta)).square())
    # at the reference itself the sigmoid loss is log 2 for every pair
    torch.testing.assert_close(dpo_loss(ref, ref, beta)[0], torch.full((5,), 0.6931472))


def test_dpo_at_tp2_dp2_and_pp2_dp2_matches_one_rank(policy, tmp_path):
    """The reference is scored once (each DP rank its share, all-gathered); the step's pairs are split
    over DP ranks in micro-batches of 2; losses are means over every rank's pairs."""
    base = [f"--init={policy}", "--steps=4", "--batch_pairs=8", "--eval_every=2", "--optim.lr=1e-3",
            "--optim.warmup_steps=1", "--micro_batch_pairs=2", "--export_hf=false", "--beta=0.5"]
    one = train_workers.dpo_history(0, 1, base + [f"--out_dir={tmp_path}/one"])
    keys = ["loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm", "eval_accuracy",
            "eval_margin", "eval_loss"]
    for layout in (["--parallel.tp=2"], ["--parallel.pp=2"]):
        four = run_ranks(4, train_workers.dpo_history, base + layout + [f"--out_dir={tmp_path}/{layout[0][-4:]}"])
        for rank in four:
            for a, b in zip(one, rank):
                for k in keys:
                    # at step 1 the policy is the reference: margins are round-off (padded to other
                    # lengths than the reference pass), so the share of positive ones is noise
                    noise = k == "accuracy" and abs(a.get("margin", 1.0)) < 1e-4
                    if k in a and not noise:
                        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (layout, k, a[k], b[k])
    steps = [h for h in one if "loss" in h]
    assert steps[0]["loss"] == pytest.approx(0.6931472, rel=1e-5)  # the policy starts at the reference
    assert steps[-1]["loss"] != steps[0]["loss"] and one[-1]["eval_accuracy"] > 0
    assert one[0]["eval_accuracy"] == 0 and one[0]["eval_margin"] == 0  # margins start at exactly 0
    assert (tmp_path / "one" / "checkpoint" / "trident_index.json").is_file()


@pytest.mark.parametrize("case,message", [
    (["--beta=0"], "beta"),
    (["--loss=kto"], "loss"),
    (["--loss=ipo", "--label_smoothing=0.1"], "label_smoothing"),
])
def test_dpo_bad_input_is_one_line_and_leaves_no_run(policy, tmp_path, capsys, case, message):
    out = tmp_path / "run"
    code = main(["dpo", f"--init={policy}", "--steps=1", "--eval=null", "--export_hf=false", f"--out_dir={out}", *case])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_dpo_rejects_an_empty_dataset_and_pairs_that_do_not_fit(policy, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["dpo", f"--init={policy}", f"--train={empty}", "--eval=null", f"--out_dir={tmp_path}/e"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "empty" in err and len(err.splitlines()) == 1
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "9 " * 100, "chosen": "1", "rejected": "2"}) + "\n")
    code = main(["dpo", f"--init={policy}", f"--train={long}", "--eval=null", f"--out_dir={tmp_path}/l"])
    assert code != 0 and "max_len" in capsys.readouterr().err
