"""`trident ppo`'s configuration: typed dataclasses, a docstring per field (checked by parallel/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from engine.config import ParallelConfig, PrecisionSettings, validate
from engine.errors import ConfigError
from engine.reward import RewardConfig, resolve_rule
from engine.train_state import CheckpointConfig
from parallel.config import Fraction, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Range


@dataclass
class RolloutConfig:
    backend: Literal["auto", "vllm", "native"] = "auto"
    """auto (vllm when installed), vllm or native (the engine's own TP sampler on the training weights)."""
    prompts: str = "data/arith_prompts.jsonl"
    """JSONL with a `prompt` field (plus whatever the reward rules read, e.g. `answer`)."""
    prompts_per_step: PositiveInt = 64
    """Prompts sampled per PPO step (over all DP ranks; must divide by the DP size)."""
    samples_per_prompt: PositiveInt = 1
    """Responses sampled per prompt (the group the grpo / rloo baselines average over)."""
    temperature: NonNegFloat = 1.0
    """Sampling temperature (0: greedy); log-probs are of softmax(logits / temperature)."""
    top_p: Fraction = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: NonNegInt = 0
    """Keep the k most likely tokens (0 disables top-k)."""
    max_new_tokens: PositiveInt = 8
    """Longest response (prompts that leave no room for it in the context are skipped)."""
    ignore_eos: bool = False
    """Always generate max_new_tokens (benchmarks); EOS then ends nothing."""
    vllm_tp: PositiveInt = 1
    """vLLM's own tensor-parallel size (workers, and with placement separate ranks, per engine)."""
    engines: PositiveInt = 1
    """vLLM engines; the prompts of a step are split across them in whole groups (prompts_per_step must
    divide by it)."""
    placement: Literal["colocated", "separate"] = "colocated"
    """colocated: engines on training ranks (engine e on rank e * world / engines), sharing their devices.
    separate: the launch's last engines x vllm_tp ranks (devices, hosts) only generate; the rest train."""
    transfer: Literal["auto", "shm", "network"] = "auto"
    """How weights reach the engines after an update, each slice sent once by the rank that owns it.
    shm: one shared-memory file on a single host; network: a gloo (CPU) / NCCL (GPU) transfer group
    per engine that its vLLM workers join; auto: shm when colocated on one host, else network."""
    async_: bool = False
    """`rollout.async`: generate step k+1's rollouts while step k trains (placement separate; a policy
    lag of one, the PPO ratio taken against the behaviour policy's log-probs from the engine)."""
    sync_bucket_mb: PositiveInt = 16
    """Network transfer: the most bytes one message of packed small slices carries (slices of 256 KiB or
    more travel alone, straight from their parameter)."""
    receive_window_mb: PositiveInt = 2048
    """Network transfer: vLLM's loaders cut each worker's shard from full-shaped tensors, so a worker
    receives into full tensors; a model of up to this many MB of them gets one buffer kept across
    syncs, a larger one is received a window of this size at a time (freed once reloaded), not whole."""
    transfer_ahead: bool = True
    """Network transfer, with one receive buffer: each engine worker posts the next sync's receives
    right after a reload, and with async rollouts the trainers send the new weights as soon as an
    update ends, so the bytes travel while the engines generate and the sync only reloads. false:
    every transfer starts at the sync (a stalled engine is then caught by the transfer itself)."""
    timeout_s: PositiveFloat = 600
    """Longest wait on an engine (a generation's results, a weight transfer) before the run ends with
    an error naming it."""
    vllm_eager: bool = True
    """Skip vLLM's graph compilation (fast start; compiled is faster per token)."""
    vllm_cpu_reserve: NonNegInt = 0
    """CPU only: cores vLLM's worker leaves free for its scheduler. 0 gives the worker every core (the
    trainer is idle while vLLM generates; on 2 cores PPO L generates in 3.5 s instead of 5.0 s); 1 is
    vLLM's own default, better for small batches whose steps are mostly scheduling (PPO tiny)."""
    engine_log_level: Literal["debug", "info", "warning", "error"] = "warning"
    """Log level of the generation engine (vLLM): info shows its start-up and per-request logs."""


@dataclass
class AlgoConfig:
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "gae"
    """gae: critic + GAE (PPO; OpenRLHF, veRL `gae`). Critic-free (no critic is built or trained):
    grpo: (r - group mean) / group std (DeepSeekMath; veRL `grpo`, OpenRLHF `group_norm`);
    dr_grpo: r - group mean (Dr. GRPO, Liu et al. 2025; pair it with loss_agg seq-mean-token-sum);
    rloo: r - mean of the prompt's other samples (Ahmadian et al. 2024; veRL / OpenRLHF `rloo`);
    reinforce_pp: the return of the KL-shaped token rewards whitened over the global batch (REINFORCE++,
    Hu et al. 2025; OpenRLHF `reinforce`, veRL `reinforce_plus_plus`); reinforce_pp_baseline: the same
    after centring each score on its group's mean (OpenRLHF `reinforce_baseline`). The group methods
    need rollout.samples_per_prompt > 1; a prompt with a single valid sample gets advantage 0."""
    epochs: PositiveInt = 1
    """Passes over each rollout buffer."""
    minibatches: PositiveInt = 1
    """Optimizer steps per epoch (the rollout buffer is split into this many minibatches)."""
    micro_batch_size: PositiveInt = 64
    """Rows per forward/backward (minibatches accumulate over micro-batches)."""
    clip_eps: Annotated[float, Range(0, 1, above=True, below=True)] = 0.2
    """PPO's ratio clip: the surrogate is clipped to [1 - clip_eps, 1 + clip_eps] (veRL clip_ratio,
    OpenRLHF eps_clip); clip_eps_low / clip_eps_high override either side."""
    clip_eps_low: Annotated[float, Range(0, 1, above=True, below=True)] | None = None
    """Lower side of the clip, 1 - clip_eps_low (None: clip_eps; veRL clip_ratio_low)."""
    clip_eps_high: PositiveFloat | None = None
    """Upper side of the clip, 1 + clip_eps_high (None: clip_eps). DAPO's clip-higher (Yu et al. 2025)
    sets 0.28 against a low side of 0.2, so unlikely tokens can still grow (veRL clip_ratio_high,
    OpenRLHF eps_clip_low_high)."""
    dual_clip: Annotated[float, Range(1, above=True)] | None = None
    """Dual-clip bound c > 1 for negative advantages (Ye et al. 2020; veRL clip_ratio_c, OpenRLHF
    dual_clip), or None."""
    log_ratio_clamp: PositiveFloat | None = 20.0
    """Clamp of log(pi / pi_old) to [-c, c] before the ratio's exponential, so one token cannot make the
    loss inf (veRL clamps it to 20 always); its gradient is zero where the clamp is active. None: off."""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses (policy, KL, entropy, value) become one loss over the whole minibatch, every
    micro-batch and DP rank included (veRL loss_agg_mode): token-mean = sum / tokens (veRL's default,
    OpenRLHF, TRL); seq-mean-token-mean = the mean over sequences of each one's token mean (the GRPO
    paper); seq-mean-token-sum = the mean over sequences of each one's token sum (Dr. GRPO: long
    responses are not down-weighted)."""
    value_clip: PositiveFloat | None = 0.2
    """Clip of the critic's new values around the old ones in its loss, or None."""
    gamma: Fraction = 1.0
    """Discount of GAE."""
    lam: Fraction = 0.95
    """GAE's lambda (bias / variance trade-off of the advantage)."""
    kl_coef: NonNegFloat = 0.02
    """Weight of the KL to the reference (in the reward or in the loss, see kl_mode)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman's k1, k2, k3; k3 is veRL's low_var_kl and OpenRLHF's k3) the
    reward (or loss) is shaped with; the `kl` metrics and the adaptive controller read k1."""
    kl_clamp: PositiveFloat | None = 10.0
    """Clamp of the shaping KL estimate to [-c, c] per token (veRL clamps low_var_kl, k3, to 10). None: off."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """reward: -coef*KL folded into token rewards; loss: coef*KL added to the policy loss."""
    kl_target: PositiveFloat | None = None
    """Adaptive KL controller target (None: fixed coefficient), in the units kl_controller_input says."""
    kl_controller_input: Literal["seq-sum", "token-mean"] = "seq-sum"
    """What the adaptive controller compares with kl_target: seq-sum = the batch mean of each response's
    summed k1 KL (TRL's and Ziegler et al.'s convention; the `kl` metric); token-mean = the mean k1 KL
    per response token (veRL's and OpenRLHF's; the `kl_per_token` metric). A target copied from a veRL
    or OpenRLHF config needs token-mean."""
    kl_horizon: PositiveInt = 10000
    """Adaptive controller horizon (Ziegler et al. 2019): larger reacts more slowly."""
    entropy_coef: NonNegFloat = 0.0
    """Weight of the entropy bonus in the policy loss."""
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
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
    ptx_coef: NonNegFloat = 0.0
    """Weight of a pretraining/SFT loss mixed into the actor update (PPO-ptx)."""
    ptx_data: str | None = None
    """SFT JSONL for PPO-ptx."""

    def clip_range(self) -> tuple[float, float]:
        """(low, high): the ratio is clipped to [1 - low, 1 + high]."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        return low, self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclass
class EvalConfig:
    path: str | None = "data/arith_eval.jsonl"
    """Held-out prompts, answered greedily (None: no evaluation)."""
    rules: dict[str, float] = field(default_factory=lambda: {"arith": 1.0})
    """Rules that grade them: eval_accuracy = share of responses every rule scores >= 1 (with a reward
    model, eval_reward = its mean score too). Empty: no accuracy."""
    every: PositiveInt = 5
    """Evaluate every N steps (and before the first and after the last)."""
    limit: PositiveInt = 200
    """At most this many held-out prompts."""


@dataclass
class PPOConfig(PrecisionSettings):
    actor: str = "runs/demo_sft/checkpoint"
    """Initial policy: native checkpoint or HF directory (the reference is a frozen copy)."""
    critic: str | None = None
    """Value-head checkpoint to start the critic from (e.g. the reward model); None: the actor's
    weights with a zero-initialised value head."""
    tokenizer: str = "data/tokenizer.model"
    """A sentencepiece .model, an HF tokenizer.json, or a directory holding one."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward rules and / or a reward model."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation: engine, prompts, sampling."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm: advantages, clipping, KL, epochs and minibatches."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out greedy evaluation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / DP layout of the four models (the same for each)."""
    actor_lr: NonNegFloat = 1e-5
    """The actor's constant learning rate."""
    critic_lr: NonNegFloat = 5e-5
    """The critic's constant learning rate."""
    clip_grad: NonNegFloat = 1.0
    """Clip each model's global gradient norm to this (0 disables)."""
    distributed_optimizer: bool = False
    """ZeRO-1 for actor and critic (train / rm: optim.distributed): fp32 masters and moments sharded
    over the DP group."""
    steps: PositiveInt = 20
    """PPO iterations (each: one rollout, then epochs x minibatches of updates)."""
    seed: int = 0
    """Seeds prompt order, sampling and minibatch order."""
    out_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, curves.png, actor/ (native), hf/."""
    export_hf: bool = True
    """Write the final actor as an HF directory (out_dir/hf) besides the native checkpoint."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training-state checkpoints (out_dir/checkpoints/step-N): actor, critic, both optimizers, the
    KL controller, reward moments, prompt / minibatch order and PPO-ptx position."""
    resume: str | None = None
    """Resume from a training-state checkpoint, a checkpoints directory or a run directory; unset, a
    run directory that already holds checkpoints resumes from its latest."""


def check_config(cfg: PPOConfig) -> None:
    """Everything a PPO run refers to, resolved before any model or engine starts."""
    validate(cfg)
    if cfg.algo.advantage not in ("gae", "reinforce_pp") and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"algo.advantage={cfg.algo.advantage} needs rollout.samples_per_prompt >= 2")
    if cfg.parallel.virtual_stages != 1:
        raise ConfigError("ppo pipelines actor and critic in one shared 1F1B schedule: parallel.virtual_stages must be 1")
    if cfg.rollout.backend == "native" and cfg.parallel.pp > 1:
        raise ConfigError("the native sampler runs without pipeline parallelism (pp = 1); use rollout.backend=vllm")
    from engine.rollout import vllm_available  # imports torch-heavy modules: only when checking
    if cfg.rollout.backend == "vllm" and not vllm_available():
        raise ConfigError("rollout.backend=vllm but vllm does not import here (install the `vllm` extra)")
    for name in list(cfg.reward.rules) + list(cfg.eval.rules if cfg.eval.path else []):
        resolve_rule(name)
    if cfg.algo.ptx_coef and not cfg.algo.ptx_data:
        raise ConfigError("algo.ptx_coef > 0 needs algo.ptx_data")


def check_placement(cfg: PPOConfig, world: int) -> int:
    """Validate engines, placement, transfer and async for a launch of `world` ranks (before any model
    or engine starts); returns how many ranks the separate engines take (0 when colocated)."""
    ro, par = cfg.rollout, cfg.parallel
    from engine.rollout import vllm_available  # imports torch-heavy modules: only when checking
    vllm = ro.backend == "vllm" or (ro.backend == "auto" and vllm_available())
    if not vllm and (ro.engines > 1 or ro.placement == "separate" or ro.transfer != "auto" or ro.async_):
        raise ConfigError("rollout.engines, placement, transfer and async are for rollout.backend=vllm")
    if ro.async_ and ro.placement != "separate":
        raise ConfigError("rollout.async overlaps generation with training: it needs rollout.placement=separate")
    if ro.prompts_per_step % ro.engines:
        raise ConfigError(f"rollout.prompts_per_step ({ro.prompts_per_step}) must divide by rollout.engines "
                          f"({ro.engines}): each engine answers whole groups")
    spare = ro.engines * ro.vllm_tp if ro.placement == "separate" else 0
    trainers = world - spare
    if trainers < 1:
        raise ConfigError(f"{world} ranks leave none to train beside rollout.engines x vllm_tp = {spare}")
    if spare and ro.transfer == "shm":
        raise ConfigError("rollout.placement=separate sends weights over the network: rollout.transfer=shm "
                          "needs colocated engines")
    if not spare and trainers % ro.engines:
        raise ConfigError(f"{trainers} ranks do not split evenly over rollout.engines={ro.engines} colocated engines")
    if trainers % (par.tp * par.pp):
        raise ConfigError(f"{trainers} training ranks are not divisible by tp*pp = {par.tp}*{par.pp}")
    dp = trainers // (par.tp * par.pp)
    if ro.prompts_per_step % dp:
        raise ConfigError(f"rollout.prompts_per_step ({ro.prompts_per_step}) must divide by the "
                          f"data-parallel size ({dp})")
    return spare

