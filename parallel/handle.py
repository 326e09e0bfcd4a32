"""One training handle per model: its pipeline chunks, device, gradient buffer / data parallelism,
optimizer, precision policy and schedule dispatch. Recipes (SFT, reward model, PPO) only write step
functions and loops on top of it.

  handle = ModelHandle(chunks, state, PrecisionPolicy("bf16"), optim=OptimConfig(), total_steps=100,
                       shape_fn=...)
  stats = handle.score(step_fn, micro_batches)                  # forward only, no grad
  stats, metrics = handle.train_step(step_fn, micro_batches)    # fwd+bwd, finalise, unscale, clip, step
  stats = joint_forward_backward([(actor, fa, mbs), (critic, fc, mbs)])  # one shared pipeline schedule
  handle.state_dict()                                           # weights, optimizer, scaler, fp8, step

Step functions follow Megatron's contract: step_fn(chunk, micro_batch) -> (output, loss_fn), and on the
last stage loss_fn(output) -> (loss, stats). Losses are normalised for the whole step (over
micro-batches and DP ranks: gradients are summed). Stats values are 0-dim tensors or numbers (they
reach the host once per step, as floats) or tensors (kept on the device, e.g. per-token scores);
with pipeline stages they reach every stage. Micro-batches are moved to the handle's device.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack, nullcontext

import torch

from parallel import comm
from parallel.ddp import DistributedDataParallel
from parallel.errors import ConfigError
from parallel.fp8 import FP8Group, check_gemm_shape
from parallel.grads import clip_factor, finalize_tp_grads, grad_sq_sum, owned_grad_views, scale_grads
from parallel.optimizer import MasterWeightAdamW, OptimConfig, lr_at, param_groups
from parallel.pipeline import PipelineJob, build_order, forward_backward_no_pipelining, run_pipeline, stats_to_host
from parallel.precision import PrecisionPolicy


def to_device(obj, device: torch.device):
    """The tensors of a micro-batch (a tensor, dict, list, tuple or dataclass of them) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def arm_fp8(chunks, policy: PrecisionPolicy, state) -> FP8Group | None:
    """Put the FP8-capable linear layers (the decoder's GEMMs) on the policy's FP8 backend; returns
    the scaling state of trident's own FP8 layers (None for bf16 & co, or Transformer Engine's)."""
    if policy.fp8 is None:
        return None
    layers = [(n, m) for c in chunks for n, m in c.named_modules() if getattr(m, "fp8_capable", False)]
    for name, m in layers:
        check_gemm_shape(name, m.weight)
    if policy.backend == "te":
        from parallel.te import arm_te_linear
        if any(getattr(c, "recompute", False) for c in chunks):
            raise ConfigError("fp8.backend=te with activation recompute: the recomputed forward would run outside "
                              "TE's fp8_autocast; use fp8.backend=torch or parallel.recompute=false")
        for _, m in layers:
            arm_te_linear(m)
        return None
    reduce_over = [state.tp_dp_group] if state.tp * state.dp > 1 else []
    group = FP8Group([n for n, _ in layers], policy.fp8, state.device, state.tp_group, reduce_over)
    for i, (_, m) in enumerate(layers):
        m.fp8_meta = group.meta(i)
    return group


class ModelHandle:
    """One model on this rank (its pipeline chunks), trainable when given an OptimConfig."""

    def __init__(self, chunks: list, state, precision: PrecisionPolicy | None = None,
                 optim: OptimConfig | None = None, total_steps: int = 1, schedule: str = "1f1b", shape_fn=None):
        self.chunks, self.state, self.device = list(chunks), state, state.device
        self.precision = precision or PrecisionPolicy("fp32", device=state.device)
        self.optim_cfg, self.total_steps = optim, total_steps
        self.schedule, self.shape_fn = schedule, shape_fn
        self.trainable = optim is not None
        self.fp8 = arm_fp8(self.chunks, self.precision, state)
        for c in self.chunks:
            c.requires_grad_(self.trainable)
            c.train(self.trainable)
        self.named = [(n, p) for c in self.chunks for n, p in c.named_parameters()]
        self.params = [p for _, p in self.named if p.requires_grad]
        self.ddp = self.optimizer = None
        if self.trainable:
            # the fp32 gradient buffer (summed, or reduce-scattered under ZeRO-1, over DP) and fp32 masters
            self.ddp = DistributedDataParallel(self.params, state.dp_group, shard=optim.distributed)
            self._build_optimizer(optim)
        self.steps = 0
        """Optimizer steps taken: the LR schedule's position (steps skipped by the fp16 scaler do not count)."""
        self.skipped_steps = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.param_dtype

    def _job(self, forward_step, micro_batches) -> PipelineJob:
        if self.precision.backend == "te":
            inner = forward_step

            def forward_step(model, mb):
                with self.precision.autocast(self.state.tp_dp_group):
                    return inner(model, mb)
        micro = [to_device(mb, self.device) for mb in micro_batches]
        return PipelineJob(self.chunks, forward_step, micro, self.precision.loss_scale)

    def score(self, forward_step, micro_batches) -> list[dict]:
        """Forward-only pass over the micro-batches; loss_fn stats of each, on every rank."""
        stats = run_schedule([(self, self._job(forward_step, micro_batches))], forward_only=True)[0]
        if self.fp8 is not None and not self.trainable:
            self.fp8.step_end()  # frozen models (reference, reward) update their FP8 scales per pass
        return stats

    def forward_backward(self, forward_step, micro_batches, sync: bool = True) -> list[dict]:
        """Forward and backward, accumulating into the fp32 gradient buffer (no optimizer step).
        sync=False keeps the DP reduction for a later pass (which starts it from its backward hooks)."""
        if not self.trainable:
            raise ConfigError("this model is frozen (no optimizer): it can only score")
        return run_schedule([(self, self._job(forward_step, micro_batches))], sync=sync)[0]

    def train_step(self, forward_step, micro_batches) -> tuple[list[dict], dict]:
        """One optimizer step over the micro-batches: (loss_fn stats of each, step metrics)."""
        stats = self.forward_backward(forward_step, micro_batches)
        return stats, self.step()

    def _build_optimizer(self, optim: OptimConfig) -> None:
        """AdamW over what this rank steps: every parameter, or under ZeRO-1 its DP shard of the
        parameter buffer (flat slices, one per parameter it intersects)."""
        names = {id(p): n for n, p in self.named}
        pieces = self.ddp.owned_pieces()
        self._norm_grads = owned_grad_views(pieces)
        if optim.distributed:
            groups = [{"params": [], "grads": [], "index": [], "weight_decay": wd} for wd in (optim.weight_decay, 0.0)]
            for p, lo, hi in pieces:
                g = groups[0 if p.ndim >= 2 else 1]
                g["params"].append(p.data.view(-1)[lo:hi])
                g["grads"].append(p.main_grad.view(-1)[lo:hi])
                g["index"].append((names[id(p)], lo, hi))
            if optim.overlap_param_gather:
                self.ddp.overlap_param_gather([m for c in self.chunks for m in c.modules()])
        else:
            groups = [{**g, "index": [(names[id(p)], 0, p.numel()) for p in g["params"]]}
                      for g in param_groups(self.named, optim.weight_decay)]
        # (name, lo, hi) of each tensor the optimizer steps, in its order
        self._opt_index = [x for g in groups for x in g["index"]]
        self.optimizer = MasterWeightAdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)

    def params_ready(self) -> None:
        """Finish an overlapped ZeRO-1 parameter all-gather (before reading weights outside a forward)."""
        if self.ddp is not None:
            self.ddp.wait_params()

    @torch.no_grad()
    def step(self) -> dict:
        """Finish gradients (DP reduction, TP replicas), unscale and check them (fp16), clip, and step
        the optimizer at the schedule's LR; a step whose gradients overflow is skipped on every rank.
        Under ZeRO-1 each rank checks and steps its shard, and the updated parameters are all-gathered."""
        state, policy, cfg = self.state, self.precision, self.optim_cfg
        self.ddp.finish_grad_sync()
        finalize_tp_grads(self.params)
        sq = grad_sq_sum(self._norm_grads, self.device)
        skipped = False
        if policy.scaler is not None:
            found = (~torch.isfinite(sq)).float()
            for g in (state.tp_group, state.pp_group, state.dp_group):  # DP too: ranks hold other shards
                comm.all_reduce(found, g, "max")
            skipped = bool((found > 0).item())  # the one host sync of an fp16 step
        for g in (state.tp_group, state.pp_group) + ((state.dp_group,) if cfg.distributed else ()):
            comm.all_reduce(sq, g)
        scale = policy.loss_scale
        norm = sq.sqrt() / scale
        lr = lr_at(self.steps, cfg, self.total_steps)
        if skipped:
            self.skipped_steps += 1
        else:
            if scale != 1.0 or cfg.clip_grad > 0:
                scale_grads(self.optimizer._grads(), clip_factor(norm, cfg.clip_grad) / scale)
            self.optimizer.set_lr(lr)
            self.optimizer.step()
            self.ddp.gather_params(overlap=cfg.overlap_param_gather)
            self.steps += 1
        if policy.scaler is not None:
            policy.scaler.update(skipped)
        if self.fp8 is not None:
            self.fp8.step_end()
        self.ddp.zero_grad()
        metrics = {"grad_norm": norm, "lr": lr}
        if policy.scaler is not None:
            metrics.update(loss_scale=scale, skipped=skipped, skipped_steps=self.skipped_steps)
        return stats_to_host([metrics])[0]

    # ---- training state ------------------------------------------------------------------------------

    def optimizer_state(self) -> dict:
        """{"step": tensor, "master" | "exp_avg" | "exp_avg_sq": {name: full fp32 tensor shaped like the
        parameter}}. Under ZeRO-1 this is collective over DP (the shards are all-gathered)."""
        opt = self.optimizer.state_dict()
        params = dict(self.named)
        out = {"step": opt["step"]}
        for key in ("master", "exp_avg", "exp_avg_sq"):
            if not self.optim_cfg.distributed:
                out[key] = {n: t.view_as(params[n]) for (n, _, _), t in zip(self._opt_index, opt[key])}
                continue
            flat = torch.zeros_like(self.ddp.buffer)
            for (n, lo, hi), t in zip(self._opt_index, opt[key]):
                o = self.ddp.offset[id(params[n])]
                flat[o + lo:o + hi].copy_(t)
            for b in self.ddp.buckets:
                a, z = self.ddp.shard_range(b)
                work = comm.all_gather_flat_async(flat[b.start:b.end], flat[a:z], self.ddp.group)
                if work is not None:
                    work.wait()
            out[key] = {n: flat[self.ddp.offset[id(p)]:][:p.numel()].view_as(p) for n, p in self.named}
        return out

    def state_dict(self) -> dict:
        """The model's full training state on this rank, tensors by parameter name: weights, fp32
        masters and Adam moments (whole parameters, also under ZeRO-1), optimizer step, LR position,
        loss scaler and FP8 scaling state. Collective over DP under ZeRO-1."""
        self.params_ready()
        sd = {"steps": self.steps, "skipped_steps": self.skipped_steps,
              "model": {n: p.detach() for n, p in self.named}}
        if self.optimizer is not None:
            sd["optimizer"] = self.optimizer_state()
        if self.precision.scaler is not None:
            sd["loss_scaler"] = self.precision.scaler.state_dict()
        if self.fp8 is not None:
            sd["fp8"] = self.fp8.state_dict()
        elif self.precision.backend == "te":
            sd["fp8_te"] = {n: m.te.get_extra_state() for c in self.chunks for n, m in c.named_modules()
                            if getattr(m, "te", None) is not None}
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """The inverse of state_dict; "optimizer" may be absent (fresh optimizer state)."""
        self.params_ready()
        params = dict(self.named)
        for n, t in sd["model"].items():
            params[n].copy_(t)
        self.steps, self.skipped_steps = int(sd["steps"]), int(sd["skipped_steps"])
        if self.optimizer is not None and "optimizer" in sd:
            o = sd["optimizer"]
            mine = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"step": o["step"], **{
                k: [o[k][n].reshape(-1)[lo:hi].view_as(t) for (n, lo, hi), t in zip(self._opt_index, mine[k])]
                for k in ("exp_avg", "exp_avg_sq", "master")}})
        if self.precision.scaler is not None and "loss_scaler" in sd:
            self.precision.scaler.load_state_dict(sd["loss_scaler"])
        if self.fp8 is not None and "fp8" in sd:
            self.fp8.load_state_dict(sd["fp8"])
        if "fp8_te" in sd:
            modules = {n: m for c in self.chunks for n, m in c.named_modules() if getattr(m, "te", None) is not None}
            for n, extra in sd["fp8_te"].items():
                modules[n].te.set_extra_state(extra)


def run_schedule(pairs: list[tuple[ModelHandle, PipelineJob]], forward_only: bool = False,
                 sync: bool = True) -> list[list[dict]]:
    """Run one or several models' jobs (with the same stage split) through the schedule: one after
    another without pipeline stages, else one pipeline order (several models: the `shared` schedule,
    whose micro-batches alternate so one model fills the other's bubbles). Returns each job's stats."""
    first = pairs[0][0]
    state = first.state
    if state.pp == 1 and all(len(h.chunks) == 1 for h, _ in pairs):
        results = []
        for h, job in pairs:
            stats, n = [], len(job.micro_batches)
            for i, mb in enumerate(job.micro_batches):
                # DP reduction starts from the backward hooks of the last micro-batch only
                quiet = h.ddp is not None and not (sync and i == n - 1)
                with h.ddp.no_sync() if quiet else nullcontext():
                    stats += forward_backward_no_pipelining(job.forward_step, job.chunks[0], [mb], forward_only,
                                                            job.loss_scale)
            results.append(stats_to_host(stats))
        return results
    if first.shape_fn is None:
        raise ConfigError("pipeline parallelism needs the handle's shape_fn (activation shape per micro-batch)")
    schedule = "shared" if len(pairs) > 1 else first.schedule
    with ExitStack() as stack:
        for h, _ in pairs:
            if h.ddp is not None:
                stack.enter_context(h.ddp.no_sync())
        order = build_order(schedule, len(pairs[0][1].micro_batches), state.pp, state.pp_rank, len(first.chunks),
                            models=len(pairs), forward_only=forward_only)
        return run_pipeline(order, [job for _, job in pairs], state, first.shape_fn, first.dtype, forward_only)


def joint_forward_backward(runs: list[tuple[ModelHandle, object, list]]) -> list[list[dict]]:
    """Forward and backward of several trainable models in one schedule (actor + critic: the shared
    1F1B order under pipeline parallelism); each handle's `step()` follows."""
    return run_schedule([(h, h._job(fn, micro)) for h, fn, micro in runs])
