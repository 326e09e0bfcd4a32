"""Native sampler: greedy equals transformers' generate, log-probs equal a full forward, TP-invariant."""
import pytest
import torch

from engine.checkpoint import HFSource, load_into
from engine.model import Transformer
from engine.sampler import SamplingParams, filter_logits, generate, gather_vocab
from parallel.state import ParallelState
from tests import sampler_workers
from tests.distributed import run_ranks
from tests.hf_models import save_hf_model

EOS, PAD = 2, 0


def _prompts(vocab, lengths=(5, 9, 1, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                      pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def _engine(tmp_path):
    src = HFSource(tmp_path)
    model = Transformer(src.config, ParallelState())
    load_into(model, src)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(tmp_path, arch):
    hf = save_hf_model(arch, tmp_path)
    model = _engine(tmp_path)
    prompts = _prompts(hf.config.vocab_size)
    responses, _ = generate(model, prompts, SamplingParams(temperature=0, max_new_tokens=12), EOS, PAD)
    for p, r in zip(prompts, responses):
        expect = _hf_greedy(hf, p, 12)
        if EOS in expect:
            expect = expect[: expect.index(EOS) + 1]
        assert r == expect


def test_sampled_logprobs_equal_full_forward(tmp_path):
    save_hf_model("llama", tmp_path)
    model = _engine(tmp_path)
    prompts = _prompts(model.cfg.vocab_size)
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=10, seed=3)
    responses, logps = generate(model, prompts, params, EOS, PAD)
    for p, r, lp in zip(prompts, responses, logps):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = gather_vocab(model(ids), model)[0, len(p) - 1:-1] / params.temperature
        expect = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lp), expect, atol=1e-5)


def test_tp2_sampling_equals_tp1(tmp_path):
    save_hf_model("mistral", tmp_path)
    model = _engine(tmp_path)
    prompts = _prompts(model.cfg.vocab_size)
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=1)
    ref = generate(model, prompts, SamplingParams(**kw), EOS, PAD)
    got = run_ranks(2, sampler_workers.generate_at_tp, str(tmp_path), prompts, kw, EOS, PAD, True)
    for rank_out in got:
        assert rank_out[0] == ref[0]
        assert torch.allclose(torch.tensor(sum(rank_out[1], [])), torch.tensor(sum(ref[1], [])), atol=1e-5)


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.81)).tolist() == [[False, False, False, True]]


def test_stops_at_eos_and_respects_max_tokens(tmp_path):
    save_hf_model("llama", tmp_path)
    model = _engine(tmp_path)
    prompts = _prompts(model.cfg.vocab_size)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    full, _ = generate(model, prompts, greedy, eos_id=-1, pad_id=PAD)
    assert all(len(r) == 6 for r in full)
    eos = full[0][2]  # make prompt 0's third greedy token the EOS: its response must stop there
    cut, logps = generate(model, prompts, greedy, eos_id=eos, pad_id=PAD)
    assert cut[0] == full[0][: full[0].index(eos) + 1]
    for f, c, lp in zip(full, cut, logps):
        expect = f[: f.index(eos) + 1] if eos in f else f
        assert c == expect and len(lp) == len(c)
