"""PPOTrainer: one PPO step (rollout -> reward -> scoring -> advantages -> update) over the four
models. Each is a training handle (parallel/handle.py): the actor and critic train, the reference and
reward model only score; with pipeline stages the actor and critic update in one shared schedule.
`engine/ppo.py` runs it step after step (`trident ppo`).
"""
from __future__ import annotations

import random
import time

import torch

from engine import rl_math
from engine.build import build_handle, with_value_head
from engine.experience import (actor_forward_step, build_experience, critic_forward_step, gather_out,
                               last_value_step, logprob_step, pad_rows, ptx_forward_step, value_step)
from engine.ppo_config import PPOConfig
from engine.reward import rule_scores
from engine.rollout import Rollout, make_rollout
from engine.sampler import SamplingParams
from parallel import comm
from parallel.handle import joint_forward_backward, to_device
from parallel.optimizer import OptimConfig
from parallel.state import freeze_heap, thaw_heap


IN_FLIGHT = ("tokens", "logprobs", "prompts", "engine_seconds")  # what a checkpoint keeps of the next batch


def _ids(mb):
    return mb["input_ids"] if isinstance(mb, dict) else mb.input_ids


def constant_lr(lr: float, clip: float, distributed: bool = False) -> OptimConfig:
    return OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0, clip_grad=clip, distributed=distributed)


class PPOTrainer:
    """Actor, critic (GAE only), frozen reference, optional reward model and the rollout engine;
    `step` runs one PPO iteration on a batch of prompts and returns its metrics."""

    def __init__(self, cfg: PPOConfig, state, actor_source, critic_source=None, rm_source=None,
                 eos_id: int = 2, pad_id: int = 0, ptx_iter=None, job=None):
        self.cfg, self.state, self.pad_id, self.ptx_iter = cfg, state, pad_id, ptx_iter
        algo, par = cfg.algo, cfg.parallel
        self.use_critic = algo.advantage == "gae"

        def handle(source, optim=None):
            return build_handle(source, state, par, cfg, optim, cfg.steps * algo.epochs * algo.minibatches, _ids)

        zero = cfg.distributed_optimizer
        self.actor = handle(actor_source, constant_lr(cfg.actor_lr, cfg.clip_grad, zero))
        self.ref = handle(actor_source)
        self.critic = (handle(with_value_head(critic_source or actor_source), constant_lr(cfg.critic_lr, cfg.clip_grad, zero))
                       if self.use_critic else None)
        self.rm = handle(rm_source) if rm_source else None
        self.kl_ctl = (rl_math.AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
                       if algo.kl_target else rl_math.FixedKLController(algo.kl_coef))
        self.moments = rl_math.RunningMoments()
        self.order_rng = random.Random(cfg.seed)
        self.ptx_used = 0
        ro = cfg.rollout
        actor = self.actor.chunks if state.pp > 1 else self.actor.chunks[0]
        self.rollout = make_rollout(ro.backend, actor, eos_id, pad_id, actor_source.config.max_position_embeddings,
                                    tp_gen=ro.vllm_tp, enforce_eager=ro.vllm_eager, cpu_reserve=ro.vllm_cpu_reserve,
                                    log_level=ro.engine_log_level, engines=ro.engines, transfer=ro.transfer, job=job,
                                    bucket_mb=ro.sync_bucket_mb, timeout_s=ro.timeout_s,
                                    window_mb=ro.receive_window_mb, ahead=ro.transfer_ahead)
        self.synced = True  # the rollout engine starts from the initial actor
        freeze_heap()

    def handles(self) -> dict:
        """The trainable models, by the names their training state is saved under."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def trainer_state(self) -> dict:
        """Everything but the models a resumed run needs to continue bit-exactly (JSON)."""
        return {"kl_coef": self.kl_ctl.value, "moments": [self.moments.mean, self.moments.var, self.moments.count],
                "order_rng": self.order_rng.getstate(), "ptx_used": self.ptx_used}

    def load_trainer_state(self, s: dict) -> None:
        self.kl_ctl.value = s["kl_coef"]
        self.moments.mean, self.moments.var, self.moments.count = s["moments"]
        version, inner, gauss = s["order_rng"]
        self.order_rng.setstate((version, tuple(inner), gauss))
        for _ in range(s["ptx_used"] - self.ptx_used) if self.ptx_iter is not None else ():
            next(self.ptx_iter)
        self.ptx_used = s["ptx_used"]
        self.synced = False  # the rollout engine still holds the initial actor

    def in_flight(self, pick: list[int]) -> dict:
        """The next step's batch, which the engines generated from the previous weights while this step
        trained (async rollouts), with its prompts' indices: a checkpoint keeps it so that a resumed
        run trains on these samples as the uninterrupted run does (collective)."""
        batch = self.rollout.in_flight()  # only async rollouts post a next batch (vLLM, separate engines)
        if batch is None:
            return {}
        return {**batch.to_tensors(), "prompts": torch.tensor(pick, dtype=torch.int64),
                "engine_seconds": torch.tensor([self.rollout.engine_seconds], dtype=torch.float64)}

    def resume_in_flight(self, saved: dict, pick: list[int], say) -> None:
        """Take the batch a checkpoint kept for its next step (async rollouts), if this run's next step
        draws the same prompts (not if prompts_per_step or the data changed)."""
        if saved["prompts"].tolist() != pick:
            say("the checkpoint's batch in flight was drawn for other prompts: generating the next step's anew")
            return
        self.rollout.hold(Rollout.from_tensors(saved["tokens"], saved["logprobs"]), float(saved["engine_seconds"]))

    def sync(self) -> float:
        """Hand the current actor weights to the rollout engine (once per update)."""
        if self.synced:
            return 0.0
        self.synced = True
        return self.rollout.sync(self.actor.chunks)

    def sampling(self, step: int) -> SamplingParams:
        ro = self.cfg.rollout
        return SamplingParams(ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens, not ro.ignore_eos,
                              self.cfg.seed * 100003 + step)

    def step(self, step: int, prompts: list[list[int]], rule_fn, next_prompts: list[list[int]] | None = None) -> dict:
        """One PPO iteration. `prompts` holds each prompt `samples_per_prompt` times in a row;
        `rule_fn(responses) -> (scores, valid)` scores the generated token lists by the rules. With
        async rollouts, `next_prompts` (the next step's) start generating before this step trains, and
        this step takes the batch posted by the previous one when there is one (a policy lag of one)."""
        cfg = self.cfg
        # rollout: the generation engines answer every prompt
        t0 = time.perf_counter()
        posted = getattr(self.rollout, "pending", None) is not None or getattr(self.rollout, "ready", None) is not None
        gen = self.rollout.collect() if posted else None
        wait_s = time.perf_counter() - t0
        sync_s = self.sync()
        if gen is None:
            t0 = time.perf_counter()
            gen = self.rollout.generate(prompts, self.sampling(step))
            wait_s = time.perf_counter() - t0
        engine_s = getattr(self.rollout, "engine_seconds", wait_s)
        if next_prompts is not None:
            self.rollout.post(next_prompts, self.sampling(step + 1))  # runs while this step trains
        gen_s = wait_s
        # reward: rules on the text, the reward model on the sequence; each DP rank keeps its share
        t0 = time.perf_counter()
        exp, scores, raw_scores, valid = self.reward(prompts, gen, rule_fn)
        # scoring: old log-probs (unless taken from the rollout), reference log-probs, old values
        self.score(exp)
        # advantages: KL-shaped token rewards, then GAE on the critic's values or group baselines
        kl = self.advantages(exp, scores, valid)
        score_s = time.perf_counter() - t0
        # update: epochs x minibatches of actor and critic steps
        t0 = time.perf_counter()
        stats = self.update(exp)
        self.synced = False
        if next_prompts is not None:  # the new weights travel while the engines generate the next batch
            self.rollout.push(self.actor.chunks)
        train_s = time.perf_counter() - t0
        line = self.metrics(step, gen, raw_scores, valid, kl, exp.action_mask, stats,
                            {"sync_s": sync_s, "gen_s": gen_s, "score_s": score_s, "train_s": train_s})
        if cfg.rollout.async_:
            # what the engines spent on this batch beyond what the step waited for ran under training
            line.update(policy_lag=int(posted), engine_gen_s=engine_s, overlap_saved_s=max(0.0, engine_s - wait_s),
                        gen_tokens_per_s=sum(len(r) for r in gen.responses) / max(engine_s, 1e-9))
        return line

    def reward(self, prompts, gen, rule_fn):
        """(experience on the device, scores to train on, raw scores, valid rows) for this DP rank."""
        cfg, state = self.cfg, self.state
        scores, valid = rule_fn(gen.responses)
        valid &= torch.tensor([len(r) > 0 for r in gen.responses])
        share = len(prompts) // state.dp  # contiguous shares keep each prompt's samples together
        rows = slice(state.dp_rank * share, (state.dp_rank + 1) * share)
        exp = build_experience(prompts[rows], gen.responses[rows], valid[rows], self.pad_id)
        if cfg.algo.old_logprobs == "rollout" or cfg.rollout.async_:  # async: the behaviour policy's
            exp.old_logp = pad_rows(gen.logprobs[rows], exp.action_mask.shape[1])
        exp = to_device(exp, state.device)
        scores, valid = scores[rows].to(state.device), valid[rows].to(state.device)
        if self.rm is not None:
            scores = scores + cfg.reward.model_weight * self.rm_scores(exp)
        raw_scores = scores
        if cfg.algo.normalize_rewards:
            self.moments.update(scores, state.dp_group, valid)
            scores = scores / (self.moments.var ** 0.5 + 1e-8)
        return exp, scores, raw_scores, valid

    @torch.no_grad()
    def score(self, exp) -> None:
        micro = exp.micro_batches(self.cfg.algo.micro_batch_size)
        logp = logprob_step(self.cfg.rollout.temperature)
        if exp.old_logp is None:
            exp.old_logp = gather_out(self.actor.score(logp, micro))
        exp.ref_logp = gather_out(self.ref.score(logp, micro))
        if self.use_critic and not self.fused_values():
            exp.old_values = gather_out(self.critic.score(value_step(), micro))

    def rm_scores(self, exp) -> torch.Tensor:
        return gather_out(self.rm.score(last_value_step(), exp.micro_batches(self.cfg.algo.micro_batch_size)))

    def advantages(self, exp, scores, valid) -> torch.Tensor:
        """Fill the token rewards / advantages; returns the per-token k1 KL (masked), which the `kl`
        metrics and the adaptive controller read (the reward is shaped with the configured estimator)."""
        algo, mask = self.cfg.algo, exp.action_mask
        k1 = (exp.old_logp - exp.ref_logp) * mask
        kl = rl_math.kl_from_log_ratio(k1, algo.kl_estimator, algo.kl_clamp) * mask
        penalty = self.kl_ctl.value if algo.kl_mode == "reward" else 0.0
        group = self.cfg.rollout.samples_per_prompt
        if self.use_critic:
            exp.rewards = rl_math.token_rewards(scores, mask, kl, penalty)
            if exp.old_values is not None:  # else the critic's update pass provides the values first
                exp.advantages, exp.returns = self.gae(exp)
                self.whiten(exp)
        elif algo.advantage.startswith("reinforce_pp"):
            if algo.advantage == "reinforce_pp_baseline":
                scores = rl_math.group_advantages(scores, group, "dr_grpo", valid)  # centred on the group mean
            rewards = rl_math.token_rewards(scores, mask, kl, penalty)
            exp.advantages = rl_math.reinforce_pp_advantages(rewards, mask, algo.gamma, self.state.dp_group)
        else:
            seq_adv = rl_math.group_advantages(scores, group, algo.advantage, valid)
            exp.advantages = rl_math.outcome_advantages(seq_adv, mask, -penalty * kl)
        return k1

    def gae(self, exp) -> tuple[torch.Tensor, torch.Tensor]:
        algo = self.cfg.algo
        return rl_math.gae(exp.rewards, exp.old_values, exp.action_mask, algo.gamma, algo.lam)

    def whiten(self, exp) -> None:
        if self.cfg.algo.whiten_advantages:
            exp.advantages = rl_math.masked_whiten(exp.advantages, exp.action_mask, self.state.dp_group)

    def fused_values(self) -> bool:
        algo = self.cfg.algo
        return (self.use_critic and algo.fused_values and algo.epochs == 1 and algo.minibatches == 1
                and self.state.pp == 1)

    def update(self, exp) -> dict:
        """Epochs x minibatches of actor and critic steps. Without old values (fused_values) the critic
        goes first: its pass scores the rollout, then the actor's advantages follow from those values."""
        cfg, algo, state = self.cfg, self.cfg.algo, self.state
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(algo.epochs):
            perm = list(range(len(exp)))
            self.order_rng.shuffle(perm)  # host-side: the minibatch order is control flow, not data
            order = torch.tensor(perm, device=state.device)
            for rows in order.chunk(algo.minibatches):
                micro = exp.micro_batches(algo.micro_batch_size, rows)
                # the minibatch's tokens and sequences on every DP rank: each micro-batch's loss is its share
                norm = rl_math.LossNorm.of(exp.action_mask[rows], state.dp_group)
                actor_step = actor_forward_step(algo, cfg.rollout.temperature, norm)
                if self.ptx_iter is not None:  # PPO-ptx: its gradients join the actor's before the DP reduction
                    self.actor.forward_backward(ptx_forward_step(algo.ptx_coef), [next(self.ptx_iter)], sync=False)
                    self.ptx_used += 1
                if exp.old_values is None and self.critic is not None:
                    values = []

                    def returns_of(mb, old):
                        values.append(old)
                        return self.gae(type(mb)(**{**vars(mb), "old_values": old}))[1]

                    critic_stats = self.critic.forward_backward(critic_forward_step(algo, norm, returns_of), micro)
                    exp.old_values = torch.empty_like(exp.rewards)
                    exp.old_values[rows] = torch.cat(values)
                    exp.advantages, exp.returns = self.gae(exp)
                    self.whiten(exp)
                    stats = [self.actor.forward_backward(actor_step, exp.micro_batches(algo.micro_batch_size, rows)),
                             critic_stats]
                else:
                    runs = [(self.actor, actor_step, micro)]
                    if self.critic is not None:
                        runs.append((self.critic, critic_forward_step(algo, norm, None), micro))
                    stats = joint_forward_backward(runs)
                self.actor.step()
                if self.critic is not None:
                    self.critic.step()
                for s in (x for model_stats in stats for x in model_stats):
                    for k, v in s.items():
                        sums[k] = sums.get(k, 0.0) + v
                updates += 1
        # micro-batch stats are shares of their minibatch on this rank: summed, then (in metrics) over DP
        return {k: v / updates for k, v in sums.items()}

    def metrics(self, step, gen, raw_scores, valid, kl, mask, stats, times) -> dict:
        """The step's line: batch statistics over every DP rank, loss statistics, timings."""
        state = self.state
        tot = comm.all_reduce(torch.stack([(raw_scores * valid).sum(), (kl.sum(-1) * valid).sum(),
                                           valid.sum().double(), mask.sum().double()]).double(),
                              state.dp_group).tolist()
        if stats:
            sums = torch.tensor(list(stats.values()), dtype=torch.float64, device=state.device)
            stats = dict(zip(stats, comm.all_reduce(sums, state.dp_group).tolist()))
        mean_kl = tot[1] / tot[2] if tot[2] else 0.0
        kl_per_token = tot[1] / tot[3] if tot[3] else 0.0
        self.kl_ctl.update(mean_kl if self.cfg.algo.kl_controller_input == "seq-sum" else kl_per_token,
                           len(gen.responses))
        gen_tokens = sum(len(r) for r in gen.responses)
        return {"step": step, "reward_mean": tot[0] / tot[2] if tot[2] else float("nan"),
                "kl": mean_kl, "kl_per_token": kl_per_token, "kl_coef": self.kl_ctl.value, **stats,
                "response_len": gen_tokens / len(gen.responses),
                "gen_tokens_per_s": gen_tokens / max(times["gen_s"], 1e-9), **times,
                "step_s": sum(times.values()), "skipped_samples": len(gen.responses) - int(tot[2])}

    def evaluate(self, step: int, tokenizer, records, ids) -> dict:
        """Greedy answers to held-out prompts: accuracy under the eval rules, mean reward-model score."""
        self.sync()
        out = self.rollout.generate(ids, SamplingParams(temperature=0, max_new_tokens=self.cfg.rollout.max_new_tokens))
        line = {"step": step}
        if self.cfg.eval.rules:
            texts = [tokenizer.decode(r) for r in out.responses]
            scores, valid = rule_scores(self.cfg.eval.rules, [r["prompt"] for r in records], texts, records)
            line["eval_accuracy"] = float(((scores >= 1.0) & valid).float().mean())
        if self.rm is not None:
            exp = build_experience(ids, out.responses, torch.ones(len(ids), dtype=torch.bool), self.pad_id)
            line["eval_reward"] = float(self.rm_scores(to_device(exp, self.state.device)).mean())
        return line

    def close(self) -> None:
        self.rollout.close()
        thaw_heap()
