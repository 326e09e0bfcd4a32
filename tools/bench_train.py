"""Training-step throughput of the engine vs transformers on one device (library behind `trident bench train`).

One step = forward + loss + backward + optimizer step. The engine side is exactly what `trident train`
runs: a Transformer behind a parallel.handle.ModelHandle with a precision policy (fp32 / bf16 / fp16 /
fp8), its fp32 gradient buffer, gradient norm, loss scaler and master-weight AdamW. Everything compared
is measured in the same process and interleaved (round r runs one step of every runner, in alternating
order, plus one sample of the matmul peak), so background load hits all of them alike; only ratios
are meaningful on a shared machine.

Model FLOPs follow PaLM (Chowdhery et al. 2022, appendix B), the usual "model FLOPs utilisation":
    flops/token = 6 * N + 12 * L * H * Q * T
N: parameters that take part in matmuls (every decoder layer's projections + the LM head; the input
embedding is a lookup and does not count), L layers, H query heads, Q head dim, T sequence length.
The attention term counts the full (non-causal) score matrix, as PaLM and Megatron do. MFU is against
the bf16 matmul peak measured in the run, for every precision (fp8's own GEMM peak is reported too);
on a CPU without native bf16 GEMMs, against the fp32 peak (the engine's GEMMs run in fp32 there).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from engine.checkpoint import RandomSource, load_into
from engine.config import ModelConfig
from engine.model import Transformer
from parallel.handle import ModelHandle
from parallel.fp8 import scaled_mm
from parallel.layers import vocab_parallel_cross_entropy
from parallel.optimizer import OptimConfig
from parallel.precision import PrecisionPolicy
from parallel.state import ParallelState, tune_malloc

IGNORE = -100


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    kv_heads: int | None = None

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                           max_position_embeddings=max(2048, self.seq))


SIZES = {
    "tiny": Size(hidden=64, layers=2, heads=4, ffn=176, vocab=512, seq=64, batch=2),
    "S": Size(hidden=512, layers=4, heads=8, ffn=1376, vocab=8192, seq=512, batch=4),
    "M": Size(hidden=1024, layers=8, heads=16, ffn=2816, vocab=8192, seq=512, batch=4),
    # GPU-sized, 1B class (Llama-style TinyLlama shape without GQA)
    "G1B": Size(hidden=2048, layers=16, heads=16, ffn=5632, vocab=32000, seq=2048, batch=8),
}


def matmul_params(cfg: ModelConfig) -> int:
    """N of the FLOPs formula: weights used in matmuls (layers + LM head), embedding lookup excluded."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * h
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * h


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training (fwd + bwd) model FLOPs per token, PaLM appendix B: 6N + 12*L*H*Q*T."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _labels(data: torch.Tensor) -> torch.Tensor:
    """Targets of inputs data[:, :-1]: the next token, IGNORE at the last position (HF's labels=input_ids
    convention, so both sides average the same s-1 tokens per sequence)."""
    labels = data[:, 1:].clone()
    labels[:, -1] = IGNORE
    return labels


# ---- runners: one training step each ---------------------------------------------------------------

def use_torch_attention() -> None:
    """A/B baseline: the engine's attention calls torch's F.scaled_dot_product_attention instead of
    kernels.attention's (patches engine.model's reference only, in this process)."""
    import engine.model

    engine.model.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention


def lm_step(model, mb):
    """(output, loss_fn): the per-token mean next-token loss, as engine/train.py forms it."""
    logits = model(mb["ids"])

    def loss_fn(logits):
        labels = mb["labels"]
        keep = labels != IGNORE
        loss = (vocab_parallel_cross_entropy(logits, labels, None, model.vocab_start) * keep).sum() / keep.sum()
        return loss, {"loss": loss.detach()}

    return logits, loss_fn


class EngineRunner:
    """trident's Transformer trained through the ModelHandle at one precision (AdamW lr 3e-4, weight
    decay 0.1, no clipping: transformers' side takes the same update)."""

    def __init__(self, cfg: ModelConfig, precision: str, device: torch.device, seed: int = 0):
        state = ParallelState(device=device)
        policy = PrecisionPolicy(precision, device=device)
        self.model = Transformer(cfg, state, dtype=policy.param_dtype)
        load_into(self.model, RandomSource(cfg, seed))
        optim = OptimConfig(lr=3e-4, min_lr=3e-4, warmup_steps=0, weight_decay=0.1, clip_grad=0.0)
        self.handle = ModelHandle([self.model], state, policy, optim)
        self.name, self.precision, self.compiled = f"engine_{precision}", precision, None

    def step(self, data: torch.Tensor) -> float:
        stats, _ = self.handle.train_step(lm_step, [{"ids": data[:, :-1], "labels": _labels(data)}])
        return stats[0]["loss"]


class CompiledRunner:
    """The same model, handle and optimizer with each decoder layer under torch.compile (what
    parallel.compile=true does); switched on for this runner's steps only."""

    def __init__(self, engine: EngineRunner):
        self.engine, self.name, self.precision = engine, engine.name + "_compiled", engine.precision
        self.layers = [torch.compile(layer) for layer in engine.model.layers.values()]

    def step(self, data: torch.Tensor) -> float:
        self.engine.model._compiled_layers = self.layers
        try:
            return self.engine.step(data)
        finally:
            self.engine.model._compiled_layers = None


class HFRunner:
    """transformers' LlamaForCausalLM trained as its users do: fp32 model, bf16 via torch.autocast."""

    def __init__(self, cfg: ModelConfig, autocast: bool, device: torch.device, seed: int = 0):
        import transformers

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                             if k not in ("architectures", "model_type", "torch_dtype")},
                                          attn_implementation="sdpa")
        self.model = transformers.LlamaForCausalLM(hf_cfg).to(device).train()
        # Same weights as the engine runner (canonical names are HF names), so first losses agree.
        src = RandomSource(cfg, seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(src.read(name, None, 0, 0, tuple(p.shape)))
        self.autocast, self.device, self.name, self.precision = autocast, device, "hf", "hf"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.1, fused=True)

    def step(self, data: torch.Tensor) -> float:
        ids = data[:, :-1]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ---- matmul peaks ----------------------------------------------------------------------------------

class MatmulPeak:
    """Best TFLOP/s of an n x n x n GEMM on the device, sampled between training steps: torch.mm in
    `dtype`, or (fp8) the FP8 GEMM the layers run (parallel.fp8.scaled_mm: torch._scaled_mm on CUDA) of
    e4m3 operands with bf16 output."""

    def __init__(self, dtype: torch.dtype, n: int, device: torch.device, fp8: bool = False):
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
        self.n, self.device, self.best, self.fp8 = n, device, 0.0, fp8
        if fp8:
            self.a, self.b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
            self.one = torch.ones((), device=device)
        else:
            self.a, self.b = a.to(dtype), b.to(dtype)
        self._run()

    def _run(self):
        if self.fp8:
            return scaled_mm(self.a, self.b, self.one, self.one, torch.bfloat16)
        return torch.mm(self.a, self.b)

    def sample(self, reps: int = 3) -> None:
        for _ in range(reps):
            _sync(self.device)
            t = time.perf_counter()
            self._run()
            _sync(self.device)
            self.best = max(self.best, 2.0 * self.n ** 3 / (time.perf_counter() - t) / 1e12)


# ---- the benchmark ---------------------------------------------------------------------------------

def _batch(size: Size, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size.vocab, (size.batch, size.seq + 1), generator=g).to(device)


def profile_step(runner, data: torch.Tensor, top: int = 15) -> str:
    """torch.profiler's table of one step (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(data)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def _other_runnable(samples: int = 10) -> int:
    """Most runnable tasks seen in /proc/loadavg over ~0.5 s, not counting this process's reader: > 0
    means other processes compete for the cores (the 1-minute load average also counts our own past runs)."""
    most = 0
    try:
        for _ in range(samples):
            with open("/proc/loadavg") as f:
                most = max(most, int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.05)
    except (OSError, ValueError, IndexError):
        return -1
    return most


def run(size: Size, precisions: list[str], steps: int = 8, warmup: int = 2, compare: str | None = None,
        compile_layers: bool = False, threads: int = 2, peak_n: int = 2048, size_name: str = "custom",
        profile: int = 0, malloc: str = "tuned", attention: str = "trident", device: str = "cpu", log=print) -> dict:
    """Time every precision in `precisions` (plus bf16 as their baseline when fp16 / fp8 are asked
    for), transformers with --compare hf, and each engine compiled with compile_layers."""
    import os

    dev = torch.device(device)
    load_before = os.getloadavg()[0]
    others = _other_runnable()
    torch.set_num_threads(threads)
    malloc_tuned = tune_malloc() if malloc == "tuned" and dev.type == "cpu" else False
    if attention == "torch":
        use_torch_attention()
    torch.manual_seed(0)
    cfg = size.model_config()
    tokens = size.batch * size.seq
    fpt = flops_per_token(cfg, size.seq)
    data = [_batch(size, i, dev) for i in range(4)]
    wanted = list(dict.fromkeys(precisions + (["bf16"] if {"fp16", "fp8"} & set(precisions) else [])))
    engines = [EngineRunner(cfg, p, dev) for p in wanted]
    runners = list(engines)
    if compare == "hf":
        runners.append(HFRunner(cfg, autocast=wanted != ["fp32"], device=dev))
    # the peak of the GEMMs the engine runs: bf16, but fp32 on CPUs without native bf16 GEMMs
    # (kernels/matmul.py upcasts there; torch's bf16 kernel would read ~100x lower)
    from kernels.matmul import native_low_precision_gemm
    low = torch.bfloat16 if dev.type != "cpu" or native_low_precision_gemm(torch.bfloat16) else torch.float32
    peak = MatmulPeak(torch.float32 if wanted == ["fp32"] else low, peak_n, dev)
    fp8_peak = MatmulPeak(torch.bfloat16, peak_n, dev, fp8=True) if "fp8" in wanted else None
    first_loss, compile_s = {}, {}
    for r in runners:
        for i in range(warmup):
            first_loss.setdefault(r.name, r.step(data[i % len(data)]))
    if compile_layers:
        for e in engines:
            comp = CompiledRunner(e)
            t = time.perf_counter()
            for i in range(warmup):  # the first compiles forward and backward
                comp.step(data[i % len(data)])
            compile_s[comp.name] = time.perf_counter() - t
            runners.append(comp)
    times = {r.name: [] for r in runners}
    for i in range(steps):
        for r in (runners if i % 2 == 0 else runners[::-1]):
            _sync(dev)
            t = time.perf_counter()
            r.step(data[i % len(data)])
            _sync(dev)
            times[r.name].append(time.perf_counter() - t)
        peak.sample(1)
        if fp8_peak:
            fp8_peak.sample(1)
    for _ in range(3):
        peak.sample()
    if profile:
        for r in runners:
            log(f"--- profile of one {r.name} step (self CPU time, top {profile} ops) ---")
            log(profile_step(r, data[0], profile))

    def stats(name: str) -> dict:
        med, best = statistics.median(times[name]), min(times[name])
        return {"tokens_per_s": tokens / med, "tokens_per_s_best": tokens / best, "step_s": med,
                "tflops": fpt * tokens / med / 1e12, "mfu": fpt * tokens / med / 1e12 / peak.best}

    def paired(num: str, den: str) -> float:
        """Median over rounds of num's step time / den's in the same round (robust to load changes)."""
        return statistics.median(a / b for a, b in zip(times[num], times[den]))

    per = {}
    for r in runners:
        if r.name == "hf":
            continue
        s = stats(r.name)
        if "hf" in times:
            s.update(ratio_vs_hf=s["tokens_per_s"] / stats("hf")["tokens_per_s"], ratio_vs_hf_paired=paired("hf", r.name))
        base = "engine_bf16" + ("_compiled" if r.name.endswith("_compiled") else "")
        if r.precision != "bf16" and base in times:
            s.update(ratio_vs_bf16=s["tokens_per_s"] / stats(base)["tokens_per_s"], ratio_vs_bf16_paired=paired(base, r.name))
        s["first_loss"] = first_loss.get(r.name)
        per[r.name.removeprefix("engine_")] = s
    main = per[precisions[0]]
    out = {"size": size_name, "precision": precisions[0], "precisions": per, "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "threads": threads,
           "tokens_per_step": tokens, "flops_per_token": fpt, "peak_tflops": peak.best, "peak_dtype": str(peak.a.dtype),
           "peak_n": peak_n, "steps": steps, "warmup": warmup, **main,
           "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "other_runnable_at_start": others,
           "malloc": "tuned" if malloc_tuned else "default", "engine_attention": attention, "dims": asdict(size),
           "compile_s": compile_s, "step_times": {k: [round(t, 4) for t in v] for k, v in times.items()}}
    if fp8_peak:
        out["fp8_peak_tflops"] = fp8_peak.best
    if "hf" in times:
        hf = stats("hf")
        out.update({"hf_tokens_per_s": hf["tokens_per_s"], "hf_tflops": hf["tflops"], "hf_mfu": hf["mfu"],
                    "hf_recipe": "fp32 model + torch.autocast(bf16)" if wanted != ["fp32"] else "fp32",
                    "first_loss_hf": first_loss["hf"], "ratio": main["ratio_vs_hf"]})
    return out
