"""Scalar-head models (critic / reward): per-token values equal transformers' score head, at TP 1 and 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from engine.checkpoint import HFSource, load_into
from engine.model import Transformer
from parallel.state import ParallelState
from tests import parity_workers
from tests.distributed import run_ranks


def _hf_value_model(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    return model


def test_value_head_matches_hf_score_at_tp1_and_tp2(tmp_path):
    hf = _hf_value_model(tmp_path)
    ids = torch.randint(1, 101, (2, 20))
    with torch.no_grad():
        ref = hf.score(hf.model(input_ids=ids).last_hidden_state).squeeze(-1)
    src = HFSource(tmp_path)
    assert src.config.value_head
    model = Transformer(src.config, ParallelState())
    load_into(model, src)
    last = torch.tensor([[19], [7]])  # a reward model reads the last real token's value
    with torch.no_grad():
        assert (model(ids) - ref).abs().max() <= 1e-5
        assert (model(ids, select=last) - ref.gather(1, last)).abs().max() <= 1e-5
    for values, at_last in run_ranks(2, parity_workers.values_at_tp2_sp, str(tmp_path), ids, last):
        assert (values - ref).abs().max() <= 1e-5
        assert (at_last - ref.gather(1, last)).abs().max() <= 1e-5


@pytest.mark.slow
def test_train_under_torchrun_tp2(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "engine.cli", "train",
           "--steps=3", "--micro_batch_size=2", "--data.seq_len=32", "--model.num_layers=1",
           "--parallel.tp=2", f"--out_dir={tmp_path}/run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3
    index = json.loads((tmp_path / "run" / "checkpoint" / "trident_index.json").read_text())
    assert index["layout"]["tp"] == 2
