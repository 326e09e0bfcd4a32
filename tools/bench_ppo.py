"""`trident bench ppo`: seconds per PPO step, split into generation, weight sync, scoring and training.

Policy, critic and reward model are Llamas of one size with random weights (vocab 4096); prompts are
random token ids; every response is exactly `response` tokens long (EOS ignored) so runs compare.
One PPO epoch, one minibatch, as in the reference settings of the PPO issue. The weight-sync overhead
is our whole sync (TP gather, serialisation, RPC, reload) against vLLM's own `reload_weights` of the
same tensors timed inside its worker.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from engine.checkpoint import RandomSource
from engine.config import ModelConfig

VOCAB = 4096


@dataclass
class PPOSize:
    hidden: int
    layers: int
    heads: int
    ffn: int
    prompts: int
    response: int
    prompt_len: int = 64

    def model_config(self, value_head: bool = False) -> ModelConfig:
        return ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_layers=self.layers, num_heads=self.heads, value_head=value_head,
                           max_position_embeddings=self.prompt_len + self.response)


SIZES = {"tiny": PPOSize(256, 4, 4, 688, prompts=16, response=32),
         "L": PPOSize(512, 8, 8, 1376, prompts=64, response=128),
         # L's width, batch and lengths at a quarter and a half of its depth: the engine's cost per layer
         # and per step, and what the planner's count leaves out (`trident plan ppo --calibrate`)
         "L-d2": PPOSize(512, 2, 8, 1376, prompts=64, response=128),
         "L-d4": PPOSize(512, 4, 8, 1376, prompts=64, response=128)}

# TRL 1.12.0 PPOTrainer (trl.experimental.ppo), same settings, idle machine (from the PPO issue)
TRL_SECONDS = {"tiny": {"step_s": 0.94},
               "L": {"step_s": 37.5, "gen_s": 6.8, "ref_s": 2.9, "reward_value_s": 5.3, "train_s": 22.0}}


def _config(size: PPOSize, backend: str, dtype: str, old_logprobs: str):
    from engine.ppo import PPOConfig
    cfg = PPOConfig(precision=dtype, seed=0)
    cfg.rollout.backend = backend
    cfg.rollout.prompts_per_step = size.prompts
    cfg.rollout.max_new_tokens = size.response
    cfg.rollout.ignore_eos = True
    cfg.algo.epochs = cfg.algo.minibatches = 1
    cfg.algo.micro_batch_size = size.prompts
    cfg.algo.old_logprobs = old_logprobs
    cfg.reward.rules = {}
    return cfg


def run(size: PPOSize, backend: str = "vllm", dtype: str = "bf16", steps: int = 3, warmup: int = 1,
        old_logprobs: str = "recompute", size_name: str = "custom", vllm_eager: bool = True,
        compile_layers: bool = False, vllm_cpu_reserve: int = 0, network: bool = False, log=print) -> dict:
    from engine.ppo_trainer import PPOTrainer
    from parallel.state import init_parallel

    state = init_parallel(1, 1)
    cfg = _config(size, backend, dtype, old_logprobs)
    cfg.rollout.vllm_eager = vllm_eager
    cfg.parallel.compile = compile_layers
    cfg.rollout.vllm_cpu_reserve = vllm_cpu_reserve
    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg, state, RandomSource(size.model_config(), seed=1),
                         critic_source=RandomSource(size.model_config(value_head=True), seed=2),
                         rm_source=RandomSource(size.model_config(value_head=True), seed=3))
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, VOCAB, (size.prompt_len - 1,), generator=g).tolist()
               for _ in range(size.prompts)]

    def no_rules(responses):
        return torch.zeros(len(responses)), torch.ones(len(responses), dtype=torch.bool)

    lines = []
    for i in range(warmup + steps):
        line = trainer.step(i + 1, prompts, no_rules)
        line["sync_s"] = trainer.sync()  # the next step's sync, timed here so every timed step has one
        line["step_s"] += line["sync_s"]
        if i >= warmup:
            lines.append(line)
        log(f"step {i + 1}{' (warmup)' if i < warmup else ''}: " + "  ".join(
            f"{k} {line[k]:.2f}" for k in ("step_s", "gen_s", "sync_s", "score_s", "train_s")))
    res = {"size": size_name, "dims": vars(size), "backend": trainer.rollout.name, "dtype": dtype,
           "vllm_eager": vllm_eager, "compile": compile_layers, "vllm_cpu_reserve": vllm_cpu_reserve,
           "old_logprobs": old_logprobs, "setup_s": round(setup_s, 2), "steps": steps,
           **{k: round(statistics.median(x[k] for x in lines), 4)
              for k in ("step_s", "gen_s", "sync_s", "score_s", "train_s", "gen_tokens_per_s")},
           # the fastest timed step per phase: the least disturbed by other work on a shared machine
           "fastest": {k: round(min(x[k] for x in lines), 4) for k in ("gen_s", "sync_s", "score_s", "train_s")}}
    if trainer.rollout.name == "vllm":
        res.update(_sync_overhead(trainer, res["sync_s"]))
        if network:
            res.update(_network_transfer(trainer, prompts, trainer.sampling(0)))
    if size_name in TRL_SECONDS:
        res["trl_step_s"] = TRL_SECONDS[size_name]["step_s"]
        res["speedup_vs_trl"] = round(res["trl_step_s"] / res["step_s"], 2)
    trainer.close()
    return res


def _sync_overhead(trainer, step_sync_s: float, rounds: int = 5) -> dict:
    """Our whole sync against vLLM's own `reload_weights` of the same tensors, already deserialised
    inside its worker, timed under the same conditions: alternating, back to back (vLLM's worker answers
    an RPC faster within ~1 s of its last one, so a sync right after a training step, `step_sync_s`,
    also pays that wake-up). The reload is timed around the RPC (what any caller of vLLM pays) and
    inside the worker (the reload alone)."""
    from safetensors.torch import save

    rollout, llm = trainer.rollout, trainer.rollout.engine.llm
    llm.collective_rpc("trident_stage", args=(save({k: v.clone() for k, v in rollout.target.tensors().items()}),))
    ours, outer, inner = [], [], []
    for _ in range(rounds):
        ours.append(rollout.sync(trainer.actor.chunks))
        t0 = time.perf_counter()
        inner.append(max(llm.collective_rpc("trident_reload_staged")))
        outer.append(time.perf_counter() - t0)
    sync_s, rpc_s, inside_s = statistics.median(ours), statistics.median(outer), statistics.median(inner)
    return {"sync_back_to_back_s": round(sync_s, 4), "step_sync_s": round(step_sync_s, 4),
            "reload_weights_s": round(rpc_s, 4), "reload_weights_inside_worker_s": round(inside_s, 4),
            "sync_overhead": round(sync_s / rpc_s, 3), "sync_overhead_vs_inside": round(sync_s / inside_s, 3),
            "sync_bytes": rollout.last_sync_bytes, "sync_bytes_copied": rollout.target.last_copied}


def _network_transfer(trainer, prompts, params, rounds: int = 5, settle_s: float = 1.1) -> dict:
    """The network path (transfer network: the owners' slices over a gloo transfer group that a second
    engine's worker joins) against the shared-memory path of the run's own engine and against vLLM's
    `reload_weights` of the same tensors inside that second engine, alternating. Each is timed after
    `settle_s` of quiet: vLLM's workers spin (sched_yield) for 1 s after a request, and on 2 cores the
    other engine's spin would take a core from the transfer's two ends; every timed call thus also
    wakes its worker from idle, as a sync after a training step does.

    Two network syncs: synchronous rollouts (the transfer starts at the sync, into receives the worker
    posted after its last reload), and async ones (the weights pushed as an update ends, landing while
    the engine generates the next batch; the sync after that generation is what a step waits for). The
    async case also times that generation against one with no transfer under it."""
    from safetensors.torch import save

    from engine.rollout import VLLMRollout

    shm, chunks = trainer.rollout, trainer.actor.chunks
    net = VLLMRollout(chunks, shm.eos_id, chunks[0].cfg.max_position_embeddings, transfer="network")
    try:
        llm = net.engine.llm  # one rank: every piece is a whole tensor
        llm.collective_rpc("trident_stage", args=(save({p.name: p.tensor.clone() for p in net.sender.pieces}),))
        times: dict[str, list[float]] = {k: [] for k in ("shm", "network", "receiving", "reloading", "reload",
                                                         "reload_inside", "ahead", "ahead_receiving",
                                                         "gen_under_push", "gen_alone")}

        def network_sync(key: str) -> None:
            times[key].append(net.sync(chunks))
            (receiving, reloading), = llm.collective_rpc("trident_receive_times")
            times["receiving" if key == "network" else "ahead_receiving"].append(receiving)
            if key == "network":
                times["reloading"].append(reloading)

        for _ in range(rounds):
            time.sleep(settle_s)
            times["shm"].append(shm.sync(chunks))
            time.sleep(settle_s)
            network_sync("network")
            time.sleep(settle_s)
            t0 = time.perf_counter()
            inside, = llm.collective_rpc("trident_reload_staged")
            times["reload"].append(time.perf_counter() - t0)
            times["reload_inside"].append(inside)
            time.sleep(settle_s)
            t0 = time.perf_counter()
            net.push(chunks)  # as an async step does when its update ends
            net.generate(prompts, params)
            times["gen_under_push"].append(time.perf_counter() - t0)
            time.sleep(settle_s)
            network_sync("ahead")
            time.sleep(settle_s)
            t0 = time.perf_counter()
            net.generate(prompts, params)
            times["gen_alone"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {"network_sync_s": round(med["network"], 4), "shm_sync_s": round(med["shm"], 4),
                # inside the engine's worker: the transfer, then vLLM's reload from what it received
                "network_receive_s": round(med["receiving"], 4), "network_reload_s": round(med["reloading"], 4),
                "network_reload_weights_s": round(med["reload"], 4),
                "network_reload_weights_inside_s": round(med["reload_inside"], 4),
                "network_vs_reload": round(med["network"] / med["reload"], 3),
                "network_vs_shm": round(med["network"] / med["shm"], 3),
                # async rollouts: the weights sent under the engine's generation, then the sync
                "network_ahead_sync_s": round(med["ahead"], 4),
                "network_ahead_receive_s": round(med["ahead_receiving"], 4),
                "network_ahead_vs_reload": round(med["ahead"] / med["reload"], 3),
                "generation_under_push_s": round(med["gen_under_push"], 4),
                "generation_alone_s": round(med["gen_alone"], 4),
                "network_bytes_sent": net.last_sync_bytes, "network_bytes_received": net.last_engine_bytes,
                "shm_bytes_placed": shm.last_sync_bytes}
    finally:
        net.close()


def format_result(res: dict) -> list[str]:
    lines = [f"bench ppo {res['size']} {res['dims']}  backend {res['backend']}  dtype {res['dtype']}  "
             f"old log-probs {res['old_logprobs']}{'  compiled layers' if res['compile'] else ''}  "
             f"(median of {res['steps']} steps)",
             f"step {res['step_s']:.3f} s = generation {res['gen_s']:.3f} + sync {res['sync_s']:.3f} + "
             f"ref/reward/value scoring {res['score_s']:.3f} + training {res['train_s']:.3f}   "
             f"({res['gen_tokens_per_s']:.0f} generated tokens/s)"]
    if "sync_overhead" in res:
        lines.append(f"weight sync {res['sync_back_to_back_s']:.4f} s vs vLLM reload_weights of the same tensors "
                     f"{res['reload_weights_s']:.4f} s (alternating back to back; RPC included; "
                     f"{res['reload_weights_inside_worker_s']:.4f} s inside the worker): {res['sync_overhead']:.2f}x "
                     f"({res['sync_overhead_vs_inside']:.2f}x)  ({res['sync_bytes'] / 1e6:.1f} MB placed, "
                     f"{res['sync_bytes_copied'] / 1e6:.1f} MB copied; {res['step_sync_s']:.4f} s after a training step)")
    if "network_sync_s" in res:
        lines.append(f"network transfer (gloo, one link trainer -> engine worker) {res['network_sync_s']:.4f} s, "
                     f"{res['network_bytes_sent'] / 1e6:.1f} MB sent / {res['network_bytes_received'] / 1e6:.1f} MB "
                     f"received, vs shared memory {res['shm_sync_s']:.4f} s ({res['network_vs_shm']:.2f}x) and vs "
                     f"vLLM reload_weights of the same tensors {res['network_reload_weights_s']:.4f} s "
                     f"({res['network_vs_reload']:.2f}x); inside the worker {res['network_receive_s']:.4f} s "
                     f"receiving, then {res['network_reload_s']:.4f} s reloading (bare reload_weights "
                     f"{res['network_reload_weights_inside_s']:.4f} s)")
        lines.append(f"network transfer ahead (async rollouts: pushed as the update ends, landing under the "
                     f"engine's generation) {res['network_ahead_sync_s']:.4f} s at the sync "
                     f"({res['network_ahead_vs_reload']:.2f}x reload_weights; {res['network_ahead_receive_s']:.4f} s "
                     f"of it waiting on receives); the generation it ran under {res['generation_under_push_s']:.3f} s, "
                     f"{res['generation_alone_s']:.3f} s with no transfer")
    if "speedup_vs_trl" in res:
        lines.append(f"TRL 1.12 PPOTrainer, same settings: {res['trl_step_s']:.2f} s/step -> "
                     f"{res['speedup_vs_trl']:.2f}x faster")
    return lines
