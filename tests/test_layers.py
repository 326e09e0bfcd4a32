"""TP building blocks against single-device definitions: vocab-parallel losses (TP 1/2/4, vocab not
divisible by TP, fp32 and bf16), the region ops of parallel/comm.py, the TP layers with sequence
parallelism, and megatron-core 0.16.1's Column/RowParallelLinear as an independent oracle.

Forward values and gradients everywhere. Two spawns: 4 ranks (losses at tp=2 x dp=2 and tp=4) and
2 ranks (region ops, SP layers, megatron).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from parallel import comm
from tests import layer_workers as lw
from tests.distributed import run_ranks

F32, BF16 = str(torch.float32), str(torch.bfloat16)


def close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tol)


# ---- vocab-parallel losses -----------------------------------------------------------------------

B, S, DP = 2, 5, 2


def _vocab_case(V: int, pass_start: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(DP, B, S, V, generator=gen)
    logits[0, 0, 1] += 300.0  # exp() overflows fp32 unless the global max is subtracted first
    logits[1, 1, 2, -1] += 15.0  # a token whose max sits on the last (short) rank
    target = torch.randint(0, V, (DP, B, S), generator=gen)
    # slice boundaries at TP 2 and 4: first/last column of each rank
    specials = sorted({0, V - 1} | {k * -(-V // tp) + e for tp in (2, 4) for k in range(1, tp)
                                    for e in (-1, 0)})
    target.view(-1)[: len(specials)] = torch.tensor(specials)
    weight = torch.randn(DP, B, S, generator=gen)  # a fixed arbitrary weight per token
    return logits, target, weight, pass_start


VOCAB_CASES = {"V37": (37, True), "V250": (250, True), "V40_default_start": (40, False)}


def vocab_reference(full, target, weight):
    """Outputs and d(sum weight*out)/d logits, computed on the full (unsplit) fp32 logits."""
    V = full.shape[-1]
    fns = {
        "ce": lambda z: F.cross_entropy(z.reshape(-1, V), target.reshape(-1),
                                        reduction="none").view(target.shape),
        "lp": lambda z: F.log_softmax(z, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1),
        "ent": lambda z: -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1),
        "lp_ent_t": lambda z: (F.log_softmax(z / 0.7, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
                               - 0.5 * (F.softmax(z / 0.7, -1) * F.log_softmax(z / 0.7, -1)).sum(-1)),
    }
    ref = {}
    for name, fn in fns.items():
        z = full.detach().float().clone().requires_grad_()
        y = fn(z)
        (g,) = torch.autograd.grad((weight * y).sum(), z)
        ref[name], ref["g_" + name] = y.detach(), g
    return ref


def check_vocab(res, ref, dtype, what):
    start, stop = res["start"], res["stop"]
    tol = {} if dtype == F32 else dict(atol=1e-4, rtol=1e-4)
    gtol = {} if dtype == F32 else dict(atol=1e-2, rtol=1e-2)
    for name in ("ce", "lp", "ent", "lp_ent_t"):
        assert res[name].dtype == torch.float32, f"{what} {name}: output dtype {res[name].dtype}"
        close(res[name], ref[name], f"{what} {name}", **tol)
        g = res["g_" + name]
        assert str(g.dtype) == dtype, f"{what} {name}: grad dtype {g.dtype}, logits were {dtype}"
        assert g.shape[-1] == stop - start
        close(g.float(), ref["g_" + name][..., start:stop], f"{what} d{name}/dlogits", **gtol)


@pytest.fixture(scope="module")
def vocab_results():
    cases = {name: _vocab_case(V, ps, seed) for seed, (name, (V, ps)) in enumerate(VOCAB_CASES.items())}
    results = [lw.unpack(r) for r in run_ranks(4, lw.vocab_losses, cases, (2, 4))]
    return cases, results


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_losses_equal_full_logits(vocab_results, tp, dtype):
    cases, results = vocab_results
    for name, (logits, target, weight, _) in cases.items():
        V = logits.shape[-1]
        covered = torch.zeros(DP, V, dtype=torch.long)
        for rank, out in enumerate(results):
            res = out[(tp, name, dtype)]
            d = res["dp"]
            full = logits[d] if dtype == F32 else logits[d].bfloat16()
            check_vocab(res, vocab_reference(full, target[d], weight[d]), dtype,
                        f"tp={tp} {name} {dtype} rank={rank}")
            covered[d, res["start"]:res["stop"]] += 1
        # the slices of each TP group tile the vocabulary exactly once
        assert (covered[: 4 // tp] == 1).all(), f"tp={tp} {name}: slices do not tile the vocab"
        assert results[tp - 1][(tp, name, dtype)]["stop"] - results[tp - 1][(tp, name, dtype)]["start"] \
            == V - (tp - 1) * math.ceil(V / tp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_losses_tp1(dtype):
    for seed, (name, (V, _)) in enumerate(VOCAB_CASES.items()):
        logits, target, weight, _ = _vocab_case(V, True, seed)
        full = logits[0].to(dtype)
        res = lw.vocab_losses_local(full, target[0], weight[0], None, None)
        res.update(start=0, stop=V)
        check_vocab(res, vocab_reference(full, target[0], weight[0]), str(dtype), f"tp=1 {name}")


# ---- TP=2: region ops, sequence-parallel layers, megatron-core -----------------------------------

TP = 2
XS_SHAPE = (TP, 2, 4, 6)  # [rank, batch, seq, hidden]: rank r feeds xs[r]


def _tp2_data():
    gen = torch.Generator().manual_seed(1234)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    xs = r(*XS_SHAPE)
    b, s, hin, hmid = 2, 4, 6, 8
    ids = torch.randint(0, 37, (b, s), generator=gen)
    ids[0, :4] = torch.tensor([0, 18, 19, 36])  # first/last row of each rank's vocab slice
    d = dict(col_x=r(b, s, hin), col_w=r(hmid, hin), col_b=r(hmid), col_g=r(b, s, hmid),
             row_x=r(b, s, hmid), row_w=r(hin, hmid), row_b=r(hin), row_g=r(b, s, hin),
             emb_ids=ids, emb_w=r(37, 5), emb_g=r(b, s, 5))
    return xs, d


@pytest.fixture(scope="module")
def tp2():
    xs, d = _tp2_data()
    results = [lw.unpack(r) for r in run_ranks(TP, lw.tp2_checks, xs, d)]
    return xs, d, results


def _cat(ts, dim):
    return torch.cat(list(ts), dim=dim)


def region_expected(op, xs, gs, r):
    """(forward, input grad) on rank r by the definitions in comm.py's docstring.

    xs[j] is rank j's input and gs[j] the gradient rank j receives for its output."""
    n = len(xs)
    return {
        "copy_to_tp": lambda: (xs[r], sum(gs)),
        "reduce_from_tp": lambda: (sum(xs), gs[r]),
        "scatter_to_tp": lambda: (xs[r].chunk(n, -1)[r], _cat(gs, -1)),
        "gather_from_tp": lambda: (_cat(xs, -1), gs[r].chunk(n, -1)[r]),
        "gather_from_sp": lambda: (_cat(xs, 1), sum(gs).chunk(n, 1)[r]),
        "gather_from_sp_no_tp_grad": lambda: (_cat(xs, 1), gs[r].chunk(n, 1)[r]),
        "reduce_scatter_to_sp": lambda: (sum(xs).chunk(n, 1)[r], _cat(gs, 1)),
        "scatter_to_sp": lambda: (xs[r].chunk(n, 1)[r], _cat(gs, 1)),
    }[op]()


@pytest.mark.parametrize("op", list(lw.REGION_OPS))
def test_region_op_tp2(tp2, op):
    xs, _, results = tp2
    gs = [out["region"][op][1] for out in results]
    for r, out in enumerate(results):
        y, _, dx, untouched = out["region"][op]
        want_y, want_dx = region_expected(op, list(xs), gs, r)
        close(y, want_y, f"{op} forward rank {r}")
        close(dx, want_dx, f"{op} backward rank {r}")
        assert untouched, f"{op} modified its input in place on rank {r}"


def test_region_ops_identity_without_group():
    x = torch.randn(2, 4, 6, requires_grad=True)
    for name, op in lw.REGION_OPS.items():
        y = op(x, None)
        assert torch.equal(y, x), name
        g = torch.randn_like(x)
        (dx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(dx, g), name
    assert comm.world(None) == 1 and comm.rank_in(None) == 0


def linear_reference(X, W, b, G):
    X, W, b = (t.clone().requires_grad_() for t in (X, W, b))
    Y = F.linear(X, W, b)
    Y.backward(G)
    return dict(y=Y.detach(), dx=X.grad, weight=W.grad, bias=b.grad)


def test_column_parallel_sequence_parallel(tp2):
    _, d, results = tp2
    ref = linear_reference(d["col_x"], d["col_w"], d["col_b"], d["col_g"])
    for r, out in enumerate(results):
        got = out["sp"]["column"]
        close(got["y"], ref["y"].chunk(TP, -1)[r], f"column SP forward rank {r}")
        close(got["dx"], ref["dx"].chunk(TP, 1)[r], f"column SP input grad rank {r}")
        close(got["weight"], ref["weight"].chunk(TP, 0)[r], f"column SP weight grad rank {r}")
        close(got["bias"], ref["bias"].chunk(TP, 0)[r], f"column SP bias grad rank {r}")


def test_row_parallel_sequence_parallel(tp2):
    _, d, results = tp2
    ref = linear_reference(d["row_x"], d["row_w"], d["row_b"], d["row_g"])
    for r, out in enumerate(results):
        got = out["sp"]["row"]
        assert got["grads_partial"], "row bias under SP must be marked grads_partial"
        # before finalisation each rank holds only its sequence chunk's share of the bias gradient
        close(got["bias_partial"], d["row_g"].chunk(TP, 1)[r].sum((0, 1)), f"row SP partial bias rank {r}")
        close(got["y"], ref["y"].chunk(TP, 1)[r], f"row SP forward rank {r}")
        close(got["dx"], ref["dx"].chunk(TP, -1)[r], f"row SP input grad rank {r}")
        close(got["weight"], ref["weight"].chunk(TP, 1)[r], f"row SP weight grad rank {r}")
        close(got["bias"], ref["bias"], f"row SP bias grad (finalised) rank {r}")


@pytest.mark.parametrize("sp", [True, False])
def test_vocab_parallel_embedding(tp2, sp):
    _, d, results = tp2
    W = d["emb_w"].clone().requires_grad_()
    Y = F.embedding(d["emb_ids"], W)
    Y.backward(d["emb_g"])
    V = W.shape[0]
    for r, out in enumerate(results):
        got = out["sp"][f"embedding_sp={sp}"]
        per_rank, start = got["per_rank"], got["start"]
        assert per_rank == math.ceil(V / TP) and start == r * per_rank
        want_y = Y.detach().chunk(TP, 1)[r] if sp else Y.detach()
        close(got["y"], want_y, f"embedding sp={sp} forward rank {r}")
        want = torch.zeros(per_rank, W.shape[1])
        real = W.grad[start:start + per_rank]
        want[: real.shape[0]] = real  # padding rows get no gradient
        close(got["weight"], want, f"embedding sp={sp} weight grad rank {r}")


MEGATRON_CASES = ["column_gather=False", "column_gather=True",
                  "row_parallel_input=True", "row_parallel_input=False"]


@pytest.mark.parametrize("case", MEGATRON_CASES)
def test_matches_megatron_core(tp2, case):
    _, d, results = tp2
    col = case.startswith("column")
    key = "col" if col else "row"
    ref = linear_reference(d[f"{key}_x"], d[f"{key}_w"], d[f"{key}_b"], d[f"{key}_g"])
    for r, out in enumerate(results):
        m = out["megatron"][case]
        assert m["bias_out"] is None  # skip_bias_add=False: megatron added the bias itself
        ours, theirs = m["ours"], m["theirs"]
        assert set(ours) == set(theirs) == {"y", "dx", "weight", "bias"}
        for k in ours:
            close(ours[k], theirs[k], f"megatron {case} {k} rank {r}")
        # and both against the single-device layer, so a shared mistake would show too
        flag = case.endswith("True")  # column: gather_output; row: input_is_parallel
        if col:
            close(ours["y"], ref["y"] if flag else ref["y"].chunk(TP, -1)[r], f"{case} forward rank {r}")
            close(ours["dx"], ref["dx"], f"{case} input grad rank {r}")
            close(ours["weight"], ref["weight"].chunk(TP, 0)[r], f"{case} weight grad rank {r}")
            close(ours["bias"], ref["bias"].chunk(TP, 0)[r], f"{case} bias grad rank {r}")
        else:
            close(ours["y"], ref["y"], f"{case} forward rank {r}")
            want_dx = ref["dx"].chunk(TP, -1)[r] if flag else ref["dx"]
            close(ours["dx"], want_dx, f"{case} input grad rank {r}")
            close(ours["weight"], ref["weight"].chunk(TP, 1)[r], f"{case} weight grad rank {r}")
            close(ours["bias"], ref["bias"], f"{case} bias grad rank {r}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_log_prob_entropy_in_row_chunks_equals_reference(monkeypatch, dtype):
    """Many row chunks (the last one short), both gradients, a temperature, ignore_index targets."""
    import parallel.layers as layers
    monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 3 * 37)
    logits, target, weight, _ = _vocab_case(37, True, 11)
    logits, target, weight = logits[0], target[0].clone(), weight[0]
    target[0, :2] = -100
    z = logits.to(dtype).requires_grad_()
    ref = vocab_reference(z.detach().float(), target.clamp(min=0), weight)
    logp, entropy = layers.vocab_parallel_log_probs_and_entropy(z, target, None, temperature=0.7)
    (weight * (logp + 0.5 * entropy)).sum().backward()
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    close(logp + 0.5 * entropy, ref["lp_ent_t"], "fused")
    close(z.grad.float(), ref["g_lp_ent_t"], "fused grad", **tol)
