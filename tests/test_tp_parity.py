"""Parallel == serial: engine logits equal transformers' at TP 1, 2, 4; TP gradients equal TP=1's."""
import pytest
import torch

from engine.checkpoint import HFSource, load_into
from engine.model import Transformer
from parallel.layers import vocab_parallel_cross_entropy
from parallel.state import ParallelState
from tests import parity_workers
from tests.distributed import run_ranks
from tests.hf_models import hf_logits, save_hf_model

ARCHS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tp1_logits_equal_transformers(arch, tmp_path):
    hf = save_hf_model(arch, tmp_path)
    src = HFSource(tmp_path)
    model = Transformer(src.config, ParallelState())
    load_into(model, src)
    ids = torch.randint(0, src.config.vocab_size, (2, 33))
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_tp4_logits_equal_transformers(tmp_path, sp):
    # one 4-rank spawn covers TP=2 (x DP2) and TP=4 for every architecture
    for arch in ARCHS:
        hf = save_hf_model(arch, tmp_path / arch)
        ids = torch.randint(0, hf.config.vocab_size, (2, 32))
        ref = hf_logits(hf, ids)
        results = run_ranks(4, parity_workers.logits_at_tp, str(tmp_path / arch), ids, (2, 4), sp)
        for rank, out in enumerate(results):
            for tp, logits in out.items():
                diff = (logits - ref).abs().max().item()
                assert diff <= 1e-4, f"{arch} tp={tp} sp={sp} rank={rank}: max diff {diff}"


def _serial_grads(hf_dir, ids, labels, select=None):
    src = HFSource(hf_dir)
    model = Transformer(src.config, ParallelState())
    load_into(model, src)
    logits = model(ids)
    if select is not None:  # the reference takes every position's logits, then picks
        logits = logits.gather(1, select[..., None].expand(-1, -1, logits.shape[-1]))
        labels = labels.gather(1, select)
    loss = vocab_parallel_cross_entropy(logits, labels, None).mean()
    loss.backward()
    params = dict(model.named_parameters())
    grads = {}
    for s in model.shard_specs():
        g = params[s.param].grad
        grads[s.name] = g if s.rows is None else g[s.rows[0]:s.rows[1]]
    return loss.item(), grads


@pytest.mark.parametrize("arch,sp", [("llama", False), ("mistral", True), ("qwen2", True)])
def test_tp2_gradients_equal_tp1(arch, sp, tmp_path):
    save_hf_model(arch, tmp_path)
    vocab = HFSource(tmp_path).config.vocab_size
    ids = torch.randint(0, vocab, (2, 16))
    labels = torch.randint(0, vocab, (2, 16))
    ref_loss, ref = _serial_grads(tmp_path, ids, labels)
    if arch == "qwen2":  # tied: the serial grad of embed includes the head's; compare the summed one
        assert "lm_head.weight" not in ref
    for rank, (loss, grads) in enumerate(run_ranks(2, parity_workers.grads_at_tp, str(tmp_path), ids, labels, 2, sp)):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        assert set(grads) == set(ref)
        for name, (dim, start, length, g) in grads.items():
            expect = ref[name] if dim is None else ref[name].narrow(dim, start, length)
            diff = (g - expect).abs().max().item()
            assert diff <= 1e-5, f"{arch} sp={sp} rank={rank} {name}: grad diff {diff}"


def test_training_attention_kernel_matches_torch_sdpa(monkeypatch):
    """Long unmasked training sequences take kernels/attention.py: loss and grads equal torch's SDPA."""
    from engine import model as model_mod
    from engine.checkpoint import RandomSource
    from engine.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    ids = torch.randint(0, 64, (2, 320))

    def loss_and_grads():
        m = Transformer(cfg, ParallelState())
        load_into(m, RandomSource(cfg, 0))
        loss = vocab_parallel_cross_entropy(m(ids[:, :-1]), ids[:, 1:], None).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}

    kernel_loss, kernel_grads = loss_and_grads()
    monkeypatch.setattr(model_mod, "scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention)
    ref_loss, ref_grads = loss_and_grads()
    assert abs(kernel_loss - ref_loss) <= 1e-5
    for n in ref_grads:
        assert torch.allclose(kernel_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("sp", [False, True])
def test_outputs_at_selected_positions_equal_tp1_loss_and_gradients(sp, tmp_path):
    """model(ids, select=positions) (head on those rows only; with SP picked after the head's gather)
    gives the serial model's logits at those positions: same loss, same gradients."""
    save_hf_model("llama", tmp_path)
    vocab = HFSource(tmp_path).config.vocab_size
    ids, labels = torch.randint(0, vocab, (2, 16)), torch.randint(0, vocab, (2, 16))
    select = torch.tensor([[3, 4, 5, 15, 0], [9, 9, 10, 11, 12]])
    ref_loss, ref = _serial_grads(tmp_path, ids, labels, select)
    for loss, grads in run_ranks(2, parity_workers.grads_at_tp, str(tmp_path), ids, labels, 2, sp, select):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for name, (dim, start, length, g) in grads.items():
            expect = ref[name] if dim is None else ref[name].narrow(dim, start, length)
            assert (g - expect).abs().max().item() <= 1e-5, name


def test_compiled_layers_equal_eager_logits_and_gradients(tmp_path):
    """parallel.compile: inductor-compiled decoder layers give the eager model's logits and gradients
    (fp32); decoding with a KV cache keeps the eager layers."""
    save_hf_model("llama", tmp_path)
    src = HFSource(tmp_path)
    ids = torch.randint(0, src.config.vocab_size, (2, 16))
    labels = torch.randint(0, src.config.vocab_size, (2, 16))
    runs = []
    for compiled in (False, True):
        model = Transformer(src.config, ParallelState())
        load_into(model, src)
        if compiled:
            model.compile_layers()
            torch._dynamo.utils.counters.clear()
        logits = model(ids)
        if compiled:  # the layers really went through dynamo
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        vocab_parallel_cross_entropy(logits, labels, None).mean().backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (comp, comp_grads) = runs
    assert (comp - eager).abs().max() <= 1e-5
    for name, g in eager_grads.items():
        assert (comp_grads[name] - g).abs().max() <= 1e-5, name
    assert model._compiled_layers is not None and len(model._compiled_layers) == len(model.layers)
