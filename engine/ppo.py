"""`trident ppo`: PPO for RLHF with actor, critic, reference and reward (rule and/or model).

One step: sync actor weights to the rollout engine -> generate -> reward -> score with actor (old
log-probs), reference and critic -> KL-shaped token rewards -> GAE -> whitened advantages ->
epochs x minibatches of actor and critic updates (each a loss-agnostic schedule run).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine import rl_math
from engine.config import parse_run_args
from engine.data import read_jsonl
from engine.errors import ConfigError, DataError
from engine.experience import actor_forward_step, build_experience, critic_forward_step, score
from engine.model import Transformer
from engine.reward import RewardConfig, rule_scores
from engine.rollout import make_rollout
from engine.run_log import RunLog
from engine.sampler import SamplingParams
from engine.tokenizer import check_vocab, load_tokenizer
from engine.train import DTYPES, ParallelConfig, build_chunks, forward_backward, save_checkpoint
from parallel import comm
from parallel.ddp import DistributedDataParallel
from parallel.grads import clip_grads, finalize_tp_grads
from parallel.optimizer import MasterWeightAdamW, param_groups
from parallel.pipeline import PipelineJob, build_order, forward_backward_no_pipelining, run_pipeline
from parallel.state import freeze_heap, init_parallel, thaw_heap


@dataclass
class RolloutConfig:
    backend: str = "auto"
    """auto (vllm when installed), vllm or native."""
    prompts: str = "data/arith_prompts.jsonl"
    """JSONL with a `prompt` field (plus whatever the reward rules read, e.g. `answer`)."""
    prompts_per_step: int = 64
    """Prompts sampled per PPO step."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group the grpo / rloo baselines average over)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_new_tokens: int = 8
    ignore_eos: bool = False
    """Always generate max_new_tokens (benchmarks); EOS then ends nothing."""
    vllm_tp: int = 1
    """vLLM's own tensor-parallel size."""
    vllm_eager: bool = True
    """Skip vLLM's graph compilation (fast start; compiled is faster per token)."""
    vllm_cpu_reserve: int = 0
    """CPU only: cores vLLM's worker leaves free for its scheduler. 0 gives the worker every core (the
    trainer is idle while vLLM generates; on 2 cores PPO L generates in 3.5 s instead of 5.0 s); 1 is
    vLLM's own default, better for small batches whose steps are mostly scheduling (PPO tiny)."""


@dataclass
class AlgoConfig:
    advantage: str = "gae"
    """gae: critic + GAE (PPO); grpo / rloo: critic-free baseline over each prompt's samples
    (needs rollout.samples_per_prompt > 1; no critic is built or trained)."""
    epochs: int = 1
    """Passes over each rollout buffer."""
    minibatches: int = 1
    """Optimizer steps per epoch."""
    micro_batch_size: int = 64
    """Rows per forward/backward (minibatches accumulate over micro-batches)."""
    clip_eps: float = 0.2
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages, or None."""
    value_clip: float | None = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02
    kl_estimator: str = "k1"
    """k1, k2 or k3."""
    kl_mode: str = "reward"
    """reward: -coef*KL folded into token rewards; loss: coef*KL added to the policy loss."""
    kl_target: float | None = None
    """Adaptive KL controller target (None: fixed coefficient)."""
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    old_logprobs: str = "recompute"
    """recompute: the actor re-scores the rollout before the update (exact in any precision);
    rollout: take the generator's own sampled-token log-probs (saves one actor forward; they agree
    with the trainer's to ~1e-6 in fp32, less in bf16)."""
    fused_values: bool = True
    """With a single on-policy update (1 epoch, 1 minibatch, pp = 1) the critic's update pass gives the
    old values (its pre-update forward), saving the critic's scoring pass; the result is identical."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over the batch (group advantages are already baselined per prompt)."""
    normalize_rewards: bool = False
    """Divide scores by a running std of all scores seen (mean kept)."""
    ptx_coef: float = 0.0
    """Weight of a pretraining/SFT loss mixed into the actor update (PPO-ptx)."""
    ptx_data: str | None = None
    """SFT JSONL for PPO-ptx."""


@dataclass
class EvalConfig:
    path: str | None = "data/arith_eval.jsonl"
    """Held-out prompts, answered greedily."""
    rules: dict = field(default_factory=lambda: {"arith": 1.0})
    """Rules that grade them: eval_accuracy = share of responses every rule scores >= 1 (with a reward
    model, eval_reward = its mean score too). Empty: no accuracy."""
    every: int = 5
    """Evaluate every N steps (and before the first and after the last)."""
    limit: int = 200


@dataclass
class PPOConfig:
    actor: str = "runs/demo_sft/checkpoint"
    """Initial policy: native checkpoint or HF directory (the reference is a frozen copy)."""
    critic: str | None = None
    """Value-head checkpoint to start the critic from (e.g. the reward model); None: the actor's
    weights with a zero-initialised value head."""
    tokenizer: str = "data/tokenizer.model"
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    actor_lr: float = 1e-5
    critic_lr: float = 5e-5
    clip_grad: float = 1.0
    steps: int = 20
    seed: int = 0
    dtype: str = "fp32"
    out_dir: str = "runs/ppo"
    export_hf: bool = True
    """Write the final actor as an HF directory (out_dir/hf) besides the native checkpoint."""


class _CriticSource:
    """A policy's weights with a fresh scalar head: zero (a critic starts at value 0) or small random
    (a reward model needs trunk gradients from its first step)."""

    def __init__(self, actor_source, head_std: float = 0.0, seed: int = 0):
        self.inner, self.head_std, self.seed = actor_source, head_std, seed

    def shape(self, name):
        return (1, self.inner.config.hidden_size) if name == "score.weight" else self.inner.shape(name)

    def read(self, name, dim, start, length):
        if name == "score.weight":
            g = torch.Generator().manual_seed(self.seed)
            return torch.randn(1, self.inner.config.hidden_size, generator=g) * self.head_std
        return self.inner.read(name, dim, start, length)


def build(source, state, cfg: PPOConfig, value_head: bool = False, trainable: bool = True) -> list[Transformer]:
    """One model's pipeline chunks on this rank (a single chunk without pipelining)."""
    model_cfg = source.config
    if value_head and not model_cfg.value_head:
        model_cfg = type(model_cfg)(**{**vars(model_cfg), "value_head": True})
        source = _CriticSource(source)
    chunks = build_chunks(source, model_cfg, cfg.parallel, state, cfg.dtype)
    for c in chunks:
        c.requires_grad_(trainable)
        c.train(trainable)
    return chunks


def load_prompts(path: str, tokenizer, max_prompt_len: int) -> tuple[list[dict], list[list[int]], int]:
    """(records, token ids, number skipped for not fitting the context with the response)."""
    records = read_jsonl(path, ("prompt",))
    keep, ids, skipped = [], [], 0
    for r in records:
        t = tokenizer.encode(r["prompt"], add_bos=True)
        if len(t) <= 1 or len(t) > max_prompt_len:
            skipped += 1
            continue
        keep.append(r)
        ids.append(t)
    if not keep:
        raise DataError(f"no prompt in {path} fits the context ({max_prompt_len} prompt tokens at most)")
    return keep, ids, skipped


def optimizer_step(chunks, optimizer, clip: float, state) -> float:
    params = [p for c in chunks for p in c.parameters() if p.requires_grad]
    finalize_tp_grads(params)
    norm = clip_grads(params, clip, [state.tp_group, state.pp_group])
    optimizer.step()
    optimizer.zero_grad()
    return norm


class PPOTrainer:
    """Actor, critic (GAE only), frozen reference, optional reward model, their optimizers and the
    rollout engine; `step` runs one PPO iteration on a batch of prompts and returns its metrics."""

    def __init__(self, cfg: PPOConfig, state, actor_source, critic_source=None, rm_source=None,
                 eos_id: int = 2, pad_id: int = 0, ptx_iter=None):
        self.cfg, self.state, self.pad_id = cfg, state, pad_id
        self.use_critic = cfg.algo.advantage == "gae"
        self.actor = build(actor_source, state, cfg)
        self.ref = build(actor_source, state, cfg, trainable=False)
        self.critic = build(critic_source or actor_source, state, cfg, value_head=True) if self.use_critic else None
        self.rm = build(rm_source, state, cfg, trainable=False) if rm_source else None
        self.actor_opt = MasterWeightAdamW(param_groups(_named(self.actor), 0.0), lr=cfg.actor_lr)
        self.critic_opt = (MasterWeightAdamW(param_groups(_named(self.critic), 0.0), lr=cfg.critic_lr)
                           if self.critic else None)
        self.actor_ddp = self.critic_ddp = None
        if state.dp > 1:
            self.actor_ddp = DistributedDataParallel([p for _, p in _named(self.actor)], state.dp_group)
            if self.critic:
                self.critic_ddp = DistributedDataParallel([p for _, p in _named(self.critic)], state.dp_group)
        hidden, sp = actor_source.config.hidden_size, cfg.parallel.sequence_parallel and state.tp > 1
        self.shape_fn = lambda exp: (len(exp), exp.input_ids.shape[1] // (state.tp if sp else 1), hidden)
        self.ptx_iter = ptx_iter
        algo = cfg.algo
        self.kl_ctl = (rl_math.AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
                       if algo.kl_target else rl_math.FixedKLController(algo.kl_coef))
        self.moments = rl_math.RunningMoments()
        if state.pp > 1 and cfg.rollout.backend == "native":
            raise ConfigError("the native sampler runs without pipeline parallelism (pp = 1); use rollout.backend=vllm")
        self.rollout = make_rollout(cfg.rollout.backend, self.actor if state.pp > 1 else self.actor[0], eos_id,
                                    pad_id, actor_source.config.max_position_embeddings,
                                    tp_gen=cfg.rollout.vllm_tp, enforce_eager=cfg.rollout.vllm_eager,
                                    cpu_reserve=cfg.rollout.vllm_cpu_reserve)
        self.synced = True  # the rollout engine starts from the initial actor
        freeze_heap()

    def sync(self) -> float:
        """Hand the current actor weights to the rollout engine (once per update)."""
        if self.synced:
            return 0.0
        self.synced = True
        return self.rollout.sync(self.actor)

    def step(self, step: int, prompts: list[list[int]], rule_fn) -> dict:
        """One PPO iteration. `prompts` holds each prompt `samples_per_prompt` times in a row;
        `rule_fn(responses) -> (scores, valid)` scores the generated token lists by the rules."""
        cfg, algo = self.cfg, self.cfg.algo
        sync_s = self.sync()

        t0 = time.perf_counter()
        sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                                  cfg.rollout.max_new_tokens, not cfg.rollout.ignore_eos, cfg.seed * 100003 + step)
        gen = self.rollout.generate(prompts, sampling)
        gen_s = time.perf_counter() - t0
        gen_tokens = sum(len(r) for r in gen.responses)

        t0 = time.perf_counter()
        scores, valid = rule_fn(gen.responses)
        valid &= torch.tensor([len(r) > 0 for r in gen.responses])
        # data parallel: every rank has the whole rollout and keeps its contiguous share (whole groups)
        dp, group = self.state.dp, self.state.dp_group
        share = len(prompts) // dp
        rows = slice(self.state.dp_rank * share, (self.state.dp_rank + 1) * share)
        prompts, responses, logprobs = prompts[rows], gen.responses[rows], gen.logprobs[rows]
        scores, valid = scores[rows], valid[rows]
        exp = build_experience(prompts, responses, valid, self.pad_id)
        if self.rm is not None:
            scores = scores + cfg.reward.model_weight * self.rm_scores(exp, algo.micro_batch_size)
        raw_scores = scores.clone()
        if algo.normalize_rewards:
            self.moments.update(scores[valid], group)
            scores = scores / (self.moments.var ** 0.5 + 1e-8)
        if algo.old_logprobs == "rollout":
            exp.old_logp = _pad_rows(logprobs, exp.action_mask.shape[1])
        fused = self.fused_values()
        score(exp, self.forward, None if algo.old_logprobs == "rollout" else self.actor, self.ref,
              None if fused else self.critic, cfg.rollout.temperature, algo.micro_batch_size)
        kl = rl_math.kl_penalty(exp.old_logp, exp.ref_logp, "k1") * exp.action_mask
        penalty = self.kl_ctl.value if algo.kl_mode == "reward" else 0.0
        kl_for_reward = kl
        if algo.kl_mode == "reward" and algo.kl_estimator != "k1":
            kl_for_reward = rl_math.kl_penalty(exp.old_logp, exp.ref_logp, algo.kl_estimator) * exp.action_mask
        if self.use_critic:
            exp.rewards = rl_math.token_rewards(scores, exp.action_mask, kl_for_reward, penalty)
            if not fused:  # else the critic's update pass provides the values first
                self.gae_advantages(exp)
        else:
            seq_adv = rl_math.group_advantages(scores, cfg.rollout.samples_per_prompt, algo.advantage, valid)
            exp.advantages = rl_math.outcome_advantages(seq_adv, exp.action_mask, -penalty * kl_for_reward)
        score_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = self.update(exp)
        self.synced = False
        train_s = time.perf_counter() - t0
        # batch statistics over every DP rank: sums of (score, kl, valid rows) and the loss stats' mean
        tot = comm.all_reduce(torch.stack([(raw_scores * valid).sum(), (kl.sum(-1) * valid).sum(),
                                           valid.sum().double()]).double(), group).tolist()
        stats = {k: v / dp for k, v in zip(stats, comm.all_reduce(
            torch.tensor(list(stats.values()), dtype=torch.float64), group).tolist())}
        mean_kl = tot[1] / tot[2] if tot[2] else 0.0
        self.kl_ctl.update(mean_kl, len(gen.responses))
        return {"step": step, "reward_mean": tot[0] / tot[2] if tot[2] else float("nan"),
                "kl": mean_kl, "kl_coef": self.kl_ctl.value, **stats,
                "response_len": gen_tokens / len(gen.responses), "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                "sync_s": sync_s, "gen_s": gen_s, "score_s": score_s, "train_s": train_s,
                "step_s": sync_s + gen_s + score_s + train_s, "skipped_samples": len(gen.responses) - int(tot[2])}

    def evaluate(self, step: int, tokenizer, records, ids) -> dict:
        """Greedy answers to held-out prompts: accuracy under the eval rules, mean reward-model score."""
        self.sync()
        params = SamplingParams(temperature=0, max_new_tokens=self.cfg.rollout.max_new_tokens)
        out = self.rollout.generate(ids, params)
        line = {"step": step}
        if self.cfg.eval.rules:
            texts = [tokenizer.decode(r) for r in out.responses]
            scores, valid = rule_scores(self.cfg.eval.rules, [r["prompt"] for r in records], texts, records)
            line["eval_accuracy"] = float(((scores >= 1.0) & valid).float().mean())
        if self.rm is not None:
            exp = build_experience(ids, out.responses, torch.ones(len(ids), dtype=torch.bool), self.pad_id)
            line["eval_reward"] = float(self.rm_scores(exp, self.cfg.algo.micro_batch_size).mean())
        return line

    def forward(self, chunks, fn, micro: list, select) -> list:
        """Forward-only over micro-batches through the model's pipeline; fn(last chunk, output, mb) runs
        on the last stage on the outputs at positions select(mb) and its results reach every rank."""
        def step(model, mb):
            out = model(mb.input_ids, select=select(mb))
            return out, lambda o: (o.new_zeros(()), {"out": fn(model, o, mb)})

        stats = forward_backward(step, chunks, micro, self.state, self.cfg.parallel, self.shape_fn,
                                 forward_only=True)
        return [s["out"] for s in stats]

    def rm_scores(self, exp, micro_batch_size: int) -> torch.Tensor:
        micro = exp.micro_batches(micro_batch_size)
        return torch.cat(self.forward(self.rm, lambda m, values, mb: values.float().squeeze(1), micro,
                                      lambda mb: mb.last_index[:, None]))

    def fused_values(self) -> bool:
        algo = self.cfg.algo
        return (self.use_critic and algo.fused_values and algo.epochs == 1 and algo.minibatches == 1
                and self.state.pp == 1)

    def gae_advantages(self, exp) -> None:
        """Advantages and returns from the token rewards and old values (advantages whitened over every
        DP rank's batch)."""
        algo = self.cfg.algo
        exp.advantages, exp.returns = rl_math.gae(exp.rewards, exp.old_values, exp.action_mask, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            exp.advantages = rl_math.masked_whiten(exp.advantages, exp.action_mask, self.state.dp_group)

    def update(self, exp) -> dict:
        """Epochs x minibatches of actor and critic updates. With pipeline stages both models run in
        one shared schedule (the critic's micro-batches fill the actor's bubbles). Without old values
        (fused_values) the critic goes first: its pass scores the rollout, then the actor's advantages
        follow from those values."""
        cfg, algo, state = self.cfg, self.cfg.algo, self.state
        gen = torch.Generator().manual_seed(cfg.seed)
        sums: dict[str, float] = {}
        count = 0
        for _ in range(algo.epochs):
            order = torch.randperm(len(exp), generator=gen)
            for mb_idx in order.chunk(algo.minibatches):
                micro = exp.micro_batches(algo.micro_batch_size, mb_idx)
                scale = 1.0 / len(micro)
                dp = state.dp_group  # losses are means over every DP rank's tokens; DDP sums the gradients
                values = []
                actor_job = PipelineJob(self.actor, actor_forward_step(algo, cfg.rollout.temperature, scale, dp), micro)
                jobs = [actor_job]
                if self.critic is not None:
                    jobs.append(PipelineJob(self.critic, critic_forward_step(
                        algo, scale, dp, on_values=lambda mb, v: values.append(v)), micro))
                with self.actor_ddp.no_sync() if self.actor_ddp else nullcontext(), \
                        self.critic_ddp.no_sync() if self.critic_ddp else nullcontext():
                    if exp.old_values is None and self.critic is not None:  # fused: critic first
                        critic_stats = forward_backward_no_pipelining(jobs[1].forward_step, self.critic[0], micro)
                        exp.old_values = torch.empty_like(exp.rewards)
                        exp.old_values[mb_idx] = torch.cat(values)
                        self.gae_advantages(exp)
                        actor_micro = exp.micro_batches(algo.micro_batch_size, mb_idx)
                        stats = [forward_backward_no_pipelining(actor_job.forward_step, self.actor[0], actor_micro),
                                 critic_stats]
                    elif state.pp == 1:
                        stats = [forward_backward_no_pipelining(j.forward_step, j.chunks[0], micro) for j in jobs]
                    else:
                        schedule = "shared" if len(jobs) == 2 else "1f1b"
                        stats = run_pipeline(build_order(schedule, len(micro), state.pp, state.pp_rank, 1, len(jobs)),
                                             jobs, state, self.shape_fn, self.actor[0].dtype)
                    if self.ptx_iter is not None:
                        _ptx_backward(self.actor[0], next(self.ptx_iter), algo.ptx_coef)
                for ddp in (self.actor_ddp, self.critic_ddp):
                    if ddp is not None:
                        ddp.finish_grad_sync()
                optimizer_step(self.actor, self.actor_opt, cfg.clip_grad, state)
                if self.critic is not None:
                    optimizer_step(self.critic, self.critic_opt, cfg.clip_grad, state)
                for s in stats[0] + (stats[1] if len(stats) > 1 else []):
                    for k, v in s.items():
                        sums[k] = sums.get(k, 0.0) + v
                count += len(micro)
        return {k: v / count for k, v in sums.items()}

    def close(self) -> None:
        self.rollout.close()
        thaw_heap()


def check_config(cfg: PPOConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    for name, allowed in (("kl_mode", ("reward", "loss")), ("kl_estimator", ("k1", "k2", "k3")),
                          ("advantage", ("gae", "grpo", "rloo")), ("old_logprobs", ("recompute", "rollout"))):
        if getattr(cfg.algo, name) not in allowed:
            raise ConfigError(f"algo.{name} must be one of {', '.join(allowed)}")
    group = cfg.rollout.samples_per_prompt
    if group < 1:
        raise ConfigError("rollout.samples_per_prompt must be >= 1")
    if cfg.rollout.vllm_cpu_reserve < 0:
        raise ConfigError("rollout.vllm_cpu_reserve must be >= 0")
    if cfg.algo.advantage != "gae" and group < 2:
        raise ConfigError(f"algo.advantage={cfg.algo.advantage} needs rollout.samples_per_prompt >= 2")


def ppo(cfg: PPOConfig) -> list[dict]:
    check_config(cfg)
    actor_source = ckpt.open_source(cfg.actor)
    actor_source.config.validate_tp(cfg.parallel.tp)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, actor_source.config.vocab_size)
    max_prompt = actor_source.config.max_position_embeddings - cfg.rollout.max_new_tokens
    records, prompt_ids, skipped_prompts = load_prompts(cfg.rollout.prompts, tokenizer, max_prompt)
    eval_records, eval_ids = [], []
    if cfg.eval.path:
        eval_records, eval_ids, _ = load_prompts(cfg.eval.path, tokenizer, max_prompt)
        eval_records, eval_ids = eval_records[: cfg.eval.limit], eval_ids[: cfg.eval.limit]
    rm_source = ckpt.open_source(cfg.reward.model) if cfg.reward.model else None
    if rm_source and not rm_source.config.value_head:
        raise ConfigError(f"reward model {cfg.reward.model} has no scalar head")

    if cfg.parallel.virtual_stages != 1:
        raise ConfigError("ppo pipelines actor and critic in one shared 1F1B schedule: parallel.virtual_stages must be 1")
    state = init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    if cfg.rollout.prompts_per_step % state.dp:
        raise ConfigError(f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) must divide by the "
                          f"data-parallel size ({state.dp})")
    if cfg.algo.ptx_coef and state.pp * state.dp > 1:
        raise ConfigError("PPO-ptx (algo.ptx_coef > 0) runs with tensor parallelism only (pp = dp = 1)")
    trainer = PPOTrainer(cfg, state, actor_source, ckpt.open_source(cfg.critic) if cfg.critic else None,
                         rm_source, tokenizer.eos_id, tokenizer.pad_id,
                         _ptx_batches(cfg, tokenizer, state) if cfg.algo.ptx_coef else None)
    out = Path(cfg.out_dir)
    main_rank = state.rank == 0
    run = RunLog(cfg.out_dir, cfg, main_rank)
    if eval_ids:
        run.log(trainer.evaluate(0, tokenizer, eval_records, eval_ids))
    rng = torch.Generator().manual_seed(cfg.seed)
    group = cfg.rollout.samples_per_prompt
    bar = tqdm(range(1, cfg.steps + 1), desc=f"ppo[{trainer.rollout.name}]", disable=not main_rank,
               dynamic_ncols=True)
    for step in bar:
        pick = torch.randperm(len(prompt_ids), generator=rng)[: cfg.rollout.prompts_per_step].tolist()
        pick = [i for i in pick for _ in range(group)]  # each prompt's samples sit together
        batch = [records[i] for i in pick]

        def rule_fn(responses, batch=batch):
            texts = [tokenizer.decode(r) for r in responses]
            return rule_scores(cfg.reward.rules, [r["prompt"] for r in batch], texts, batch)

        line = trainer.step(step, [prompt_ids[i] for i in pick], rule_fn)
        line["skipped_prompts"] = skipped_prompts
        run.log(line)
        bar.set_postfix(reward=f"{line['reward_mean']:.3f}", kl=f"{line['kl']:.3f}")
        if eval_ids and (step % cfg.eval.every == 0 or step == cfg.steps):
            run.log(trainer.evaluate(step, tokenizer, eval_records, eval_ids))
    trainer.close()
    run.close()
    save_checkpoint(trainer.actor, state, out / "actor", cfg.tokenizer)
    if main_rank:
        if cfg.export_hf:
            from tools.convert import native_to_hf
            native_to_hf(str(out / "actor"), str(out / "hf"), force=True)
        from tools.plot import plot_metrics
        plot_metrics(out / "metrics.jsonl", out / "curves.png")
    return run.history


def _named(chunks):
    return [(n, p) for c in chunks for n, p in c.named_parameters()]


def _pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def _ptx_batches(cfg, tokenizer, state):
    from engine.data import batches, pack_documents, tokenize_documents
    if not cfg.algo.ptx_data:
        raise ConfigError("algo.ptx_coef > 0 needs algo.ptx_data")
    docs = tokenize_documents(read_jsonl(cfg.algo.ptx_data), tokenizer, "sft", 64)
    data = pack_documents(docs, 64, tokenizer.pad_id)
    for micro in batches(data, 8, 1, cfg.seed, state.dp_rank, state.dp):
        yield micro[0]


def _ptx_backward(actor, mb, coef):
    from engine.data import IGNORE
    from engine.train import lm_forward_step
    mb = {**mb, "num_tokens": max(1.0, float((mb["labels"] != IGNORE).sum()))}
    logits, loss_fn = lm_forward_step(actor, mb)
    loss, _ = loss_fn(logits)
    (coef * loss).backward()


def main(argv: list[str]) -> int:
    cfg = parse_run_args(PPOConfig, argv, "trident ppo", "PPO for RLHF.")
    history = ppo(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {"steps": cfg.steps}
        for key in ("eval_accuracy", "eval_reward"):
            evals = [h[key] for h in history if key in h]
            if evals:
                summary.update({f"{key}_first": evals[0], f"{key}_last": evals[-1]})
        steps = [h for h in history if "step_s" in h]
        if steps:
            summary.update({k: round(sum(h[k] for h in steps) / len(steps), 4)
                            for k in ("step_s", "gen_s", "sync_s", "score_s", "train_s")})
        print(json.dumps({**summary, "out_dir": cfg.out_dir}))
    return 0
