"""Training-step throughput of the engine vs transformers on one process (library behind `trident bench train`).

One step = forward + loss + backward + AdamW step. Everything that is compared is measured in the same
process and interleaved (round r runs one step of every runner, in alternating order, plus one sample
of the matmul peak), so background load on the machine hits all of them alike; only ratios are
meaningful on a shared machine.

Model FLOPs follow PaLM (Chowdhery et al. 2022, appendix B), the usual "model FLOPs utilisation":
    flops/token = 6 * N + 12 * L * H * Q * T
N: parameters that take part in matmuls (every decoder layer's projections + the LM head; the input
embedding is a lookup and does not count), L layers, H query heads, Q head dim, T sequence length.
The attention term counts the full (non-causal) score matrix, as PaLM and Megatron do. Recomputation
is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from engine.checkpoint import RandomSource, load_into
from engine.config import ModelConfig
from engine.model import Transformer
from parallel.layers import vocab_parallel_cross_entropy
from parallel.state import ParallelState, tune_malloc

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


# ---- optimizers ------------------------------------------------------------------------------------

class MasterAdamW:
    """AdamW with fp32 master weights for low-precision (bf16) parameters.

    The model keeps bf16 parameters (fast matmuls, half the activation memory); the optimizer keeps an
    fp32 copy of each and fp32 moments. Weight decay on matrices only (no decay on norms), as
    parallel/optimizer.param_groups. A step casts the bf16 grads into preallocated fp32 buffers (one
    multi-tensor copy), runs torch's fused AdamW kernel on the fp32 masters and copies them back rounded
    to bf16 (one multi-tensor copy). fp32 parameters are their own masters (no copies).

    (A torch.compile'd single-pass version of the same update -- read bf16 grad, write master, moments
    and bf16 copy in one loop -- measured 2.5x slower than this on the M model: inductor's CPU loops
    lose to the fused kernel.)
    """

    def __init__(self, params, lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.params]
        self.master_grads = [torch.zeros_like(m) if m is not p else None for p, m in zip(self.params, self.masters)]
        self.exp_avg = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
        self.step_t = torch.zeros((), dtype=torch.float32)
        self.steps = [self.step_t] * len(self.params)  # fused kernel wants one step tensor per param
        decay = [p.ndim >= 2 for p in self.params]
        self.groups = [(weight_decay, [i for i, d in enumerate(decay) if d]),
                       (0.0, [i for i, d in enumerate(decay) if not d])]

    @torch.no_grad()
    def step(self) -> None:
        low = [(p.grad, g) for p, g in zip(self.params, self.master_grads) if g is not None]
        if low:
            torch._foreach_copy_([g for _, g in low], [pg for pg, _ in low])
        self.step_t += 1
        grads = [p.grad if g is None else g for p, g in zip(self.params, self.master_grads)]
        for wd, idx in self.groups:
            if idx:
                pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
                torch._fused_adamw_(pick(self.masters), pick(grads), pick(self.exp_avg), pick(self.exp_avg_sq),
                                    [], pick(self.steps), lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                                    weight_decay=wd, eps=self.eps, amsgrad=False, maximize=False)
        low_pairs = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        if low_pairs:
            torch._foreach_copy_([p for p, _ in low_pairs], [m for _, m in low_pairs])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _labels(data: torch.Tensor) -> torch.Tensor:
    """Targets of inputs data[:, :-1]: the next token, IGNORE at the last position (HF's labels=input_ids
    convention, so both sides average the same s-1 tokens per sequence)."""
    labels = data[:, 1:].clone()
    labels[:, -1] = IGNORE
    return labels


def _token_mean_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> torch.Tensor:
    token_loss = vocab_parallel_cross_entropy(logits, labels, None, vocab_start)
    keep = labels != IGNORE
    return (token_loss * keep).sum() / keep.sum()


# ---- runners: one training step each ---------------------------------------------------------------

def use_torch_attention() -> None:
    """A/B baseline: the engine's attention calls torch's F.scaled_dot_product_attention instead of
    kernels.attention's (patches engine.model's reference only, in this process)."""
    import engine.model

    engine.model.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention


class EngineRunner:
    """trident's Transformer: params/activations in `dtype`, loss in fp32, AdamW with fp32 masters."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, seed: int = 0):
        self.model = Transformer(cfg, ParallelState(), dtype=dtype)
        load_into(self.model, RandomSource(cfg, seed))
        self.model.train()
        self.opt = MasterAdamW(self.model.parameters())
        self.forward, self.loss_fn = self.model, _token_mean_loss
        self.name = "engine"

    def compiled(self, mode: str) -> "EngineRunner":
        """A runner sharing this model and optimizer whose forward runs through torch.compile (inductor).

        mode "model": the whole Transformer.forward is one graph; "layers": each DecoderLayer is compiled
        (same code for every layer, so one compilation serves all), embedding/head/loss stay eager.
        """
        other = object.__new__(EngineRunner)
        other.model, other.opt, other.name = self.model, self.opt, "engine_compiled"
        other.loss_fn = torch.compile(_token_mean_loss)  # fuses the fp32 cross-entropy's passes
        if mode == "model":
            other.forward = torch.compile(self.model)
        elif mode == "layers":
            layers = list(self.model.layers.values())
            impls = [torch.compile(layer._call_impl) for layer in layers]

            def forward(ids):
                # nn.Module.compile() would make the eager runner compiled too: switch per call instead
                for layer, impl in zip(layers, impls):
                    layer._compiled_call_impl = impl
                try:
                    return self.model(ids)
                finally:
                    for layer in layers:
                        layer._compiled_call_impl = None
            other.forward = forward
        else:
            raise ValueError(f"unknown compile mode {mode!r} (model, layers)")
        return other

    def loss(self, data: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss, as engine/train.py computes it (masked token losses, fp32)."""
        return self.loss_fn(self.forward(data[:, :-1]), _labels(data), self.model.vocab_start)

    def step(self, data: torch.Tensor) -> float:
        loss = self.loss(data)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.item()


class HFRunner:
    """transformers' LlamaForCausalLM trained as its users do: fp32 model, bf16 via torch.autocast."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, seed: int = 0):
        import transformers

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items()
                                             if k not in ("architectures", "model_type", "torch_dtype")},
                                          attn_implementation="sdpa")
        self.model = transformers.LlamaForCausalLM(hf_cfg).train()
        # Same weights as the engine runner (canonical names are HF names), so first losses agree.
        src = RandomSource(cfg, seed)
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(src.read(name, None, 0, 0, shapes[name]))
        self.dtype = dtype
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.1, fused=True)
        self.name = "hf"

    def step(self, data: torch.Tensor) -> float:
        ids = data[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ---- matmul peak -----------------------------------------------------------------------------------

class MatmulPeak:
    """Best GFLOP/s of torch.mm on n x n matrices in `dtype`, sampled between training steps."""

    def __init__(self, dtype: torch.dtype, n: int = 2048):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(dtype)
        self.b = torch.randn(n, n, generator=g).to(dtype)
        self.out = torch.empty(n, n, dtype=dtype)
        self.n, self.best = n, 0.0
        torch.mm(self.a, self.b, out=self.out)

    def sample(self, reps: int = 3) -> None:
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            dt = time.perf_counter() - t
            self.best = max(self.best, 2.0 * self.n ** 3 / dt / 1e9)


# ---- the benchmark ---------------------------------------------------------------------------------

def _batch(size: Size, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size.vocab, (size.batch, size.seq + 1), generator=g)


_CATEGORIES = [  # (category, substrings of aten op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("optimizer", ("adam", "_foreach")),
    ("copy/cast", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous")),
    ("fill/alloc", ("aten::fill_", "aten::zero_", "aten::empty")),
]


def profile_step(runner, data: torch.Tensor, top: int = 15) -> tuple[dict, str]:
    """Self CPU time of one step by op category (seconds) and the top ops table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(data)
    cats: dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        cat = next((c for c, keys in _CATEGORIES if any(k in ev.key for k in keys)), "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + ev.self_cpu_time_total / 1e6
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return dict(sorted(cats.items(), key=lambda kv: -kv[1])), table


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


def run(size: Size, dtype: str = "bf16", steps: int = 8, warmup: int = 2, compare: str | None = None,
        compile_mode: str | None = None, threads: int = 2, peak_n: int = 2048, size_name: str = "custom",
        profile: int = 0, malloc: str = "tuned", attention: str = "trident", log=print) -> dict:
    import os

    load_before = os.getloadavg()[0]
    others = _other_runnable()
    torch.set_num_threads(threads)
    malloc_tuned = tune_malloc() if malloc == "tuned" else False
    if attention == "torch":
        use_torch_attention()
    torch.manual_seed(0)
    tdtype = DTYPES[dtype]
    cfg = size.model_config()
    tokens = size.batch * size.seq
    fpt = flops_per_token(cfg, size.seq)
    data = [_batch(size, i) for i in range(4)]

    engine = EngineRunner(cfg, tdtype)
    runners = [engine]
    compile_s = None
    if compare == "hf":
        runners.append(HFRunner(cfg, tdtype))
    peak = MatmulPeak(tdtype, peak_n)

    first_loss = {}
    for r in runners:
        for i in range(warmup):
            loss = r.step(data[i % len(data)])
            first_loss.setdefault(r.name, loss)
    if compile_mode:
        t = time.perf_counter()
        comp = engine.compiled(compile_mode)
        comp.step(data[0])  # compiles forward and backward
        compile_s = time.perf_counter() - t
        for i in range(max(0, warmup - 1)):
            comp.step(data[i % len(data)])
        runners.append(comp)
    peak.sample()

    times = {r.name: [] for r in runners}
    for i in range(steps):
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            t = time.perf_counter()
            r.step(data[i % len(data)])
            times[r.name].append(time.perf_counter() - t)
        peak.sample(1)

    if profile:
        out_prof = {}
        for r in runners:
            cats, table = profile_step(r, data[0], profile)
            out_prof[r.name] = cats
            log(f"--- profile of one {r.name} step (self CPU time, top {profile} ops) ---")
            log(table)
            log(f"{r.name} by category (s): " + ", ".join(f"{k} {v:.3f}" for k, v in cats.items()))

    def stats(name: str) -> dict:
        ts = times[name]
        med, best = statistics.median(ts), min(ts)
        return {"tokens_per_s": tokens / med, "tokens_per_s_best": tokens / best, "step_s": med,
                "tflops": fpt * tokens / med / 1e12, "mfu": fpt * tokens / med / 1e9 / peak.best}

    eng = stats("engine")
    out = {"size": size_name, "dtype": dtype, "threads": threads, "tokens_per_step": tokens,
           "flops_per_token": fpt, "peak_gflops": peak.best, "peak_n": peak_n, "steps": steps, "warmup": warmup,
           "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "other_runnable_at_start": others,
           "malloc": "tuned" if malloc_tuned else "default", "engine_attention": attention,
           **eng, "dims": asdict(size), "step_times": {k: [round(t, 4) for t in v] for k, v in times.items()}}
    def paired(name: str) -> float:
        """Median over rounds of hf step time / `name` step time in the same round (robust to load that
        changes between rounds)."""
        return statistics.median(h / e for h, e in zip(times["hf"], times[name]))

    if compare == "hf":
        hf = stats("hf")
        out.update({"hf_tokens_per_s": hf["tokens_per_s"], "hf_tflops": hf["tflops"], "hf_mfu": hf["mfu"],
                    "hf_tokens_per_s_best": hf["tokens_per_s_best"],
                    "ratio": eng["tokens_per_s"] / hf["tokens_per_s"],
                    "ratio_best": eng["tokens_per_s_best"] / hf["tokens_per_s_best"],
                    "ratio_paired": paired("engine"),
                    "hf_recipe": "fp32 model + torch.autocast(cpu, bf16)" if dtype == "bf16" else "fp32",
                    "first_loss_engine": first_loss["engine"], "first_loss_hf": first_loss["hf"]})
    if profile:
        out["profile_s"] = out_prof
    if compile_mode:
        c = stats(runners[-1].name)
        out.update({"compile": compile_mode, "compile_s": compile_s,
                    "compiled_tokens_per_s": c["tokens_per_s"], "compiled_tflops": c["tflops"],
                    "compiled_mfu": c["mfu"], "compiled_tokens_per_s_best": c["tokens_per_s_best"]})
        if compare == "hf":
            out["compiled_ratio"] = c["tokens_per_s"] / out["hf_tokens_per_s"]
            out["compiled_ratio_best"] = c["tokens_per_s_best"] / out["hf_tokens_per_s_best"]
            out["compiled_ratio_paired"] = paired(runners[-1].name)
    return out
