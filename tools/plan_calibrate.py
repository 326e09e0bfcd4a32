"""`trident plan --calibrate`: the planner's model against this machine. It measures the matmul peak
(inside `bench train`), host memory bandwidth, the gloo all-reduce bandwidth and the share of the
peak each model's own GEMMs reach (timed alone), then predicts `bench train --size S` and `--size M`
and the 1F1B and interleaved steps of `bench pipeline`, each measured in the same run. Nothing is
fitted to a measured step time. Prints predicted against measured; the last line is one JSON object."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from tools.perf_model import GPU, MEGATRON_2021, Layout, Shape, pipeline_s, predict


def memcpy_gbps(mb: int = 256, reps: int = 5) -> float:
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * a.numel() * 4 / best / 1e9  # read + write


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _allreduce_rank(rank: int, world: int, mb: int) -> float:
    import torch.distributed as dist
    x = torch.ones(mb * 2**20 // 4)
    dist.all_reduce(x)
    best = min(_timed(lambda: dist.all_reduce(x)) for _ in range(3))
    return 2 * (world - 1) / world * x.numel() * 4 / best / 1e9  # ring bus bandwidth


def gloo_gbps(mb: int = 64) -> float:
    from parallel.launch import run_ranks
    return min(run_ranks(2, _allreduce_rank, mb))


def gemm_share(shape: Shape, batch: int, peak_tflops: float, dtype=torch.float32, reps: int = 3,
               forward_only: bool = False) -> float:
    """The share of the matmul peak that this model's own GEMMs reach, timed alone: every decoder
    linear and the LM head at the step's token count (batch x seq), forward (Y = X W^T) and, unless
    forward_only, both backward GEMMs (dX = dY W, dW = dY^T X). A calibration measured on shapes, not
    fitted to any step time."""
    tokens, h, hd = batch * shape.seq, shape.hidden, shape.hidden // shape.heads
    outs_ins = [(h + 2 * shape.kv_heads * hd, h), (h, h), (2 * shape.ffn, h), (h, shape.ffn), (shape.vocab, h)]
    g = torch.Generator().manual_seed(0)
    mats = [(torch.randn(tokens, i, generator=g).to(dtype), torch.randn(o, i, generator=g).to(dtype),
             torch.randn(tokens, o, generator=g).to(dtype)) for o, i in outs_ins]
    counts = [shape.layers] * 4 + [1]

    def one_pass():
        for (x, w, dy), n in zip(mats, counts):
            for _ in range(n):
                x @ w.t()
                if not forward_only:
                    dy @ w, dy.t() @ x

    one_pass()
    best = min(_timed(one_pass) for _ in range(reps))
    flops = sum((1 if forward_only else 3) * 2 * tokens * o * i * n for (o, i), n in zip(outs_ins, counts))
    return flops / best / 1e12 / peak_tflops


def nongemm_s(shape: Shape, batch: int, dtype=torch.float32, reps: int = 3, forward_only: bool = False) -> tuple[float, float]:
    """Seconds per token of the engine's own non-GEMM kernels at the step's shape, forward + backward
    (forward_only: a forward pass under no_grad, as scoring runs it):
    one decoder layer's two RMSNorms, RoPE on q and k, the causal attention core, SwiGLU and the two
    residual adds (with the model's views and copies), and the loss's cross-entropy over the vocabulary.
    Each on leaf tensors, so no GEMM runs; like gemm_share, measured on shapes, not on a step."""
    from kernels.attention import scaled_dot_product_attention
    from kernels.rmsnorm import rms_norm
    from kernels.rope import apply_rope, inv_frequencies, rope_cos_sin
    from kernels.swiglu import swiglu
    from parallel.layers import vocab_parallel_cross_entropy

    b, s, h, nq, nkv = batch, shape.seq, shape.hidden, shape.heads, shape.kv_heads
    hd = h // nq
    g = torch.Generator().manual_seed(0)

    def leaf(*size):
        return torch.randn(*size, generator=g).to(dtype).requires_grad_()

    x, w1, w2 = leaf(b, s, h), leaf(h), leaf(h)
    qkv, attn_out, gate_up, mlp_out = leaf(b, s, h + 2 * nkv * hd), leaf(b, s, h), leaf(b, s, 2 * shape.ffn), leaf(b, s, h)
    cos, sin = rope_cos_sin(torch.arange(s).expand(b, s), inv_frequencies(hd, 10000.0), dtype)
    logits, labels = leaf(b * s, shape.vocab), torch.randint(0, shape.vocab, (b * s,), generator=g)

    def layer():
        n1 = rms_norm(x, w1, 1e-5)
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = apply_rope(q.view(b, s, nq, hd).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, s, nkv, hd).transpose(1, 2), cos, sin)
        o = scaled_dot_product_attention(q, k, v.view(b, s, nkv, hd).transpose(1, 2), is_causal=True,
                                         enable_gqa=nq != nkv)
        o = o.transpose(1, 2).reshape(b, s, h)
        r1 = x + attn_out
        n2 = rms_norm(r1, w2, 1e-5)
        act = swiglu(gate_up)
        r2 = r1 + mlp_out
        outs = [n1, o, n2, act, r2]
        if not forward_only:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    def head():
        loss = vocab_parallel_cross_entropy(logits, labels, None, 0).mean()
        if not forward_only:
            loss.backward()

    out = []
    with torch.set_grad_enabled(not forward_only):
        for fn in (layer, head):
            fn()
            out.append(min(_timed(fn) for _ in range(reps)) / (b * s))
    return out[0], out[1]


def _shape(size) -> Shape:
    return Shape(size.hidden, size.layers, size.heads, size.kv_heads or size.heads, size.ffn, size.vocab, size.seq)


def run(steps: int = 4, threads: int = 2) -> dict:
    from tools import bench_pipeline, bench_train

    mem, net = memcpy_gbps(), gloo_gbps()
    rows, shares, peaks, other = [], {}, {}, {}
    for name in ("S", "M"):
        size = bench_train.SIZES[name]
        r = bench_train.run(size, ["fp32"], steps=steps, warmup=1, threads=threads, size_name=name, log=lambda *a: None)
        shape = _shape(size)
        peaks[name] = r["peak_tflops"]
        # the model's constants, each measured here and none fitted to a step time: the GEMM share of
        # the peak on this size's own GEMMs, its non-GEMM kernels' time per token, memcpy bandwidth
        # for the optimizer step
        shares[name] = gemm_share(shape, size.batch, r["peak_tflops"])
        other[name] = nongemm_s(shape, size.batch)
        cpu = GPU("this-machine", r["peak_tflops"], 0, 24, mem / 1000, net, net, per_node=1)
        cal = replace(MEGATRON_2021, gemm_eff=shares[name], nongemm_layer_s=other[name][0],
                      nongemm_head_s=other[name][1], grad_comm_bytes=4.0, optimizer_pass=True)
        pred = predict(shape, Layout(1, 1, 1, size.batch, recompute="none"), size.batch, cpu, "fp32", cal)
        rows.append({"what": f"bench train --size {name} (fp32)", "predicted_s": pred["step_s"],
                     "measured_s": r["step_s"]})
    pipe = bench_pipeline.run()
    t_mb = (pipe["fwd_ms"] + pipe["bwd_ms"]) / 1000
    for sched, v in (("1f1b", 1), ("interleaved", pipe["v"])):
        # v chunks per rank: each chunk's micro-batch costs t / v
        rows.append({"what": f"bench pipeline {sched} (p={pipe['p']}, m={pipe['m']})",
                     "predicted_s": pipeline_s(t_mb, pipe["m"], pipe["p"], v), "measured_s": pipe["step_s"][sched]})
    for r in rows:
        r["error"] = r["predicted_s"] / r["measured_s"] - 1
    return {"memcpy_gbps": mem, "gloo_allreduce_gbps": net, "peak_tflops": peaks, "gemm_share": shares,
            "nongemm_us_per_token": {k: {"layer": 1e6 * v[0], "head": 1e6 * v[1]} for k, v in other.items()},
            "rows": rows, "max_error": max(abs(r["error"]) for r in rows)}


def report(res: dict) -> list[str]:
    lines = [f"this machine: matmul peak {res['peak_tflops']['S']:.3f} TFLOP/s (fp32), memcpy {res['memcpy_gbps']:.1f} "
             f"GB/s, gloo all-reduce {res['gloo_allreduce_gbps']:.2f} GB/s; the models' GEMMs reach "
             + ", ".join(f"{k} {v:.2f}" for k, v in res["gemm_share"].items()) + " of the peak",
             f"{'':48}{'predicted':>11}{'measured':>10}{'error':>8}"]
    for r in res["rows"]:
        lines.append(f"{r['what']:<48}{r['predicted_s']:>10.3f}s{r['measured_s']:>9.3f}s{r['error']:>+8.1%}")
    return lines
