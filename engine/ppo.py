"""`trident ppo`: PPO for RLHF with actor, critic, reference and reward (rule and/or model).

The run: validate everything, build the trainer (engine/ppo_trainer.py) or serve as a separate
rollout engine's rank, resume, then draw prompts and step, evaluate and checkpoint until done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine import train_state
from engine.build import check_parallel, check_precision
from engine.config import parse_run_args
from engine.data import load_prompts
from engine.engine_ranks import abort_on_error
from engine.errors import CheckpointError, ConfigError
from engine.experience import ptx_batches
from engine.ppo_config import PPOConfig, check_config, check_placement
from engine.ppo_trainer import IN_FLIGHT, PPOTrainer
from engine.reward import rule_scores
from engine.rollout import VLLMRollout
from engine.run_log import RunLog
from engine.tokenizer import check_vocab, load_tokenizer
from parallel.state import init_job


def ppo(cfg: PPOConfig) -> list[dict]:
    check_config(cfg)
    actor_source = ckpt.open_source(cfg.actor)
    model_cfg = actor_source.config
    check_parallel(cfg.parallel, model_cfg, 1)
    check_precision(cfg, model_cfg, cfg.parallel.tp)
    if cfg.rollout.max_new_tokens >= model_cfg.max_position_embeddings:
        raise ConfigError(f"rollout.max_new_tokens {cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"model's {model_cfg.max_position_embeddings} positions")
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, model_cfg.vocab_size)
    max_prompt = model_cfg.max_position_embeddings - cfg.rollout.max_new_tokens
    records, prompt_ids, skipped_prompts = load_prompts(cfg.rollout.prompts, tokenizer, max_prompt)
    eval_records, eval_ids = [], []
    if cfg.eval.path:
        eval_records, eval_ids, _ = load_prompts(cfg.eval.path, tokenizer, max_prompt)
        eval_records, eval_ids = eval_records[: cfg.eval.limit], eval_ids[: cfg.eval.limit]
    rm_source = ckpt.open_source(cfg.reward.model) if cfg.reward.model else None
    if rm_source and not rm_source.config.value_head:
        raise ConfigError(f"reward model {cfg.reward.model} has no scalar head")
    critic_source = ckpt.open_source(cfg.critic) if cfg.critic else None
    for other in (rm_source, critic_source):
        if other is not None:
            check_precision(cfg, other.config, cfg.parallel.tp)
    ptx = ptx_batches(cfg.algo.ptx_data, tokenizer, cfg.seed) if cfg.algo.ptx_coef else None
    found = train_state.resolve_resume(cfg.resume, cfg.out_dir)
    held = train_state.read_tensors(found[0]) if cfg.rollout.async_ else {}  # the batch in flight, if saved
    if held and sorted(held) != sorted(IN_FLIGHT):
        raise CheckpointError(f"{found[0] / train_state.TENSORS_FILE} holds {sorted(held)}, not a PPO batch in flight")
    ro = cfg.rollout
    spare = check_placement(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    state, job = init_job(cfg.parallel.tp, cfg.parallel.pp, spare)
    if state is None:  # a rank of a separate rollout engine: generate until the trainers are done
        engine = VLLMRollout.engine_ranks(job, ro.engines, ro.vllm_tp, ro.timeout_s)
        try:
            engine.serve()
        finally:
            engine.close()
        return []
    with abort_on_error(job, state.rank):  # separate engines' ranks would otherwise wait on their node
        trainer = PPOTrainer(cfg, state, actor_source, critic_source, rm_source, tokenizer.eos_id, tokenizer.pad_id,
                             ptx(state) if ptx else None, job)
        out = Path(cfg.out_dir)
        main_rank = state.rank == 0
        rng = torch.Generator().manual_seed(cfg.seed)
        start, saved = train_state.resume(found, trainer.handles(), state)
        if saved:
            trainer.load_trainer_state(saved)
            rng.set_state(train_state.unb64(saved["prompt_rng"]))
        run = RunLog(cfg.out_dir, cfg, main_rank, resume_step=start if found[0] is not None else None)
        if eval_ids and start == 0:
            run.log(trainer.evaluate(0, tokenizer, eval_records, eval_ids))
        saver = train_state.Saver(cfg.checkpoint, out / "checkpoints", cfg.steps, state, cfg.tokenizer)
        group = cfg.rollout.samples_per_prompt
        bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"ppo[{trainer.rollout.name}, {cfg.precision}]",
                   disable=not main_rank, dynamic_ncols=True, initial=start, total=cfg.steps)

        def draw():
            """A step's prompts (each prompt's samples together) and the generator's state after drawing them."""
            pick = torch.randperm(len(prompt_ids), generator=rng)[: ro.prompts_per_step].tolist()
            return [i for i in pick for _ in range(group)], train_state.b64(rng.get_state())

        upcoming = None
        if held and saved:  # the next step's prompts, for the batch the checkpoint kept
            upcoming = draw()
            trainer.resume_in_flight(held, upcoming[0], tqdm.write if main_rank else (lambda msg: None))
        for step in bar:
            pick, rng_after = upcoming or draw()
            upcoming = draw() if ro.async_ and step < cfg.steps else None  # generated while this step trains
            batch = [records[i] for i in pick]

            def rule_fn(responses, batch=batch):
                texts = [tokenizer.decode(r) for r in responses]
                return rule_scores(cfg.reward.rules, [r["prompt"] for r in batch], texts, batch)

            line = trainer.step(step, [prompt_ids[i] for i in pick], rule_fn,
                                [prompt_ids[i] for i in upcoming[0]] if upcoming else None)
            line["skipped_prompts"] = skipped_prompts
            run.step(line)
            bar.set_postfix(reward=f"{line['reward_mean']:.3f}", kl=f"{line['kl']:.3f}")
            if eval_ids and (step % cfg.eval.every == 0 or step == cfg.steps):
                run.log(trainer.evaluate(step, tokenizer, eval_records, eval_ids))
            saver.step_end(step, trainer.handles(), lambda: {"step": step, "prompt_rng": rng_after,
                                                            **trainer.trainer_state()},
                           lambda: trainer.in_flight(upcoming[0]) if upcoming else {})
        saver.close()
        trainer.close()
        run.close()
        ckpt.save_native(trainer.actor.chunks, state, out / "actor", cfg.tokenizer)
        if main_rank:
            if cfg.export_hf:
                from engine.hf_export import native_to_hf
                native_to_hf(str(out / "actor"), str(out / "hf"), force=True)
            from engine.run_log import plot_metrics
            plot_metrics(out / "metrics.jsonl", out / "curves.png")
        return run.history


def summary(cfg: PPOConfig, history: list[dict]) -> dict:
    """The run's one-line result: evals first and last, mean phase times."""
    out = {"steps": cfg.steps}
    for key in ("eval_accuracy", "eval_reward"):
        evals = [h[key] for h in history if key in h]
        if evals:
            out.update({f"{key}_first": evals[0], f"{key}_last": evals[-1]})
    steps = [h for h in history if "step_s" in h]
    if steps:
        out.update({k: round(sum(h[k] for h in steps) / len(steps), 4)
                    for k in ("step_s", "gen_s", "sync_s", "score_s", "train_s")})
    return {**out, "out_dir": cfg.out_dir}


def main(argv: list[str]) -> int:
    import argparse

    launch = argparse.ArgumentParser(add_help=False)
    launch.add_argument("--launcher", choices=["torchrun", "ray"], default="torchrun")
    launch.add_argument("--ranks", type=int, default=1)
    launch.add_argument("--ray-address", default=None)
    known, argv = launch.parse_known_args(argv)
    cfg = parse_run_args(PPOConfig, argv, "trident ppo", "PPO for RLHF. With --launcher ray --ranks N [--ray-address "
                         "HOST:PORT] every rank is a Ray actor (placement groups for the trainers and the engines).")
    if known.launcher == "ray":
        from engine.ppo_ray import launch_on_ray
        return launch_on_ray(cfg, argv, known.ranks, known.ray_address)
    history = ppo(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary(cfg, history)))
    return 0
