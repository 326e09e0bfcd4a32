"""Data parallelism: gradients summed over the data-parallel group, overlapped with backward.

Every gradient accumulates into one contiguous fp32 buffer (`param.main_grad` is a view into it;
`param.grad` is emptied as soon as autograd produces it), so accumulation over micro-batches is exact
in fp32 whatever the parameter dtype. The buffer is cut into buckets in reverse parameter order (the
order backward produces gradients); when every gradient of a bucket is final, a post-accumulate-grad
hook starts its reduction asynchronously, so communication overlaps the rest of the backward pass.
`no_sync()` (all micro-batches but the last) sends nothing. With a group of None (one DP rank) it is
only the fp32 gradient buffer: the same code, no communication.

With `shard=True` (the distributed optimizer, ZeRO-1) the buckets are padded to a multiple of the DP
size and *reduce-scattered*: rank r ends up with the summed gradient of its 1/dp slice of every
bucket, the only part its optimizer shard reads. The parameters then live in one contiguous buffer of
the same layout, so the updated slices are all-gathered straight into them, bucket by bucket,
optionally overlapped with the next forward pass (a pre-forward hook waits for a module's buckets).

Gradients are *summed*: losses must be normalised by the global batch (all DP ranks), as trident's
are (token counts and PPO statistics are all-reduced before the loss is formed).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from parallel import comm
from parallel.errors import ConfigError

# Shard boundaries at multiples of 64 elements keep every rank's slice 128-byte aligned for NCCL.
SHARD_ALIGN = 64


class _Bucket:
    def __init__(self, start: int, end: int, params: list, all_reduce: bool):
        self.start, self.end, self.params, self.all_reduce = start, end, params, all_reduce
        self.ready, self.work, self.gather = 0, None, None


class DistributedDataParallel:
    def __init__(self, params, group, bucket_mb: float = 25.0, shard: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.group, self.shard = group, shard
        self.dp, self.dp_rank = comm.world(group), comm.rank_in(group)
        self.sync_enabled = True
        self.offset: dict[int, int] = {}
        self.buckets: list[_Bucket] = []
        # Gradients that are partial over a TP/PP replica group (SP norms, shared KV heads, a split tied
        # embedding) are finalised by an all-reduce over that group after the DP reduction, which needs
        # their full DP sum on every rank: under sharding they get buckets that are all-reduced.
        partial = [p for p in self.params if getattr(getattr(p, "replica", None), "grads_partial", False)]
        plain = [p for p in self.params if not any(p is q for q in partial)]
        limit = int(bucket_mb * 1024**2 / 4)
        total = 0
        for members, all_reduce in ((plain, False), (partial, shard)):
            total = self._layout(list(reversed(members)), total, limit, all_reduce)
        device = self.params[0].device if self.params else None
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        for p in self.params:
            p.main_grad = self._slot(self.buffer, p)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.param_buffer = self._share_param_storage(device, total) if shard else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _layout(self, members: list, offset: int, limit: int, all_reduce: bool) -> int:
        start, group = offset, []
        for i, p in enumerate(members):
            self.offset[id(p)] = offset
            offset += p.numel()
            group.append(p)
            if offset - start >= limit or i == len(members) - 1:
                if self.shard:  # every rank's slice of the bucket is equal and aligned
                    offset = start + _round_up(offset - start, self.dp * SHARD_ALIGN)
                self.buckets.append(_Bucket(start, offset, group, all_reduce))
                start, group = offset, []
        return offset

    def _slot(self, buffer: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        o = self.offset[id(p)]
        return buffer[o:o + p.numel()].view_as(p)

    def _share_param_storage(self, device, total: int) -> torch.Tensor:
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ConfigError(f"the distributed optimizer needs one parameter dtype per model, got {sorted(map(str, dtypes))}")
        buf = torch.zeros(total, dtype=dtypes.pop() if dtypes else torch.float32, device=device)
        with torch.no_grad():
            for p in self.params:
                view = self._slot(buf, p)
                view.copy_(p)
                p.data = view
        return buf

    # ---- this rank's shard (ZeRO-1) ------------------------------------------------------------------

    def shard_range(self, bucket: _Bucket) -> tuple[int, int]:
        """[lo, hi) of the buffers this rank's optimizer owns within a bucket (the whole bucket unsharded)."""
        if not self.shard:
            return bucket.start, bucket.end
        n = (bucket.end - bucket.start) // self.dp
        return bucket.start + self.dp_rank * n, bucket.start + (self.dp_rank + 1) * n

    def owned_pieces(self) -> list[tuple[torch.Tensor, int, int]]:
        """(parameter, lo, hi): the flat element range [lo, hi) of each parameter this rank steps."""
        out = []
        for b in self.buckets:
            lo, hi = self.shard_range(b)
            for p in b.params:
                a, z = self.offset[id(p)], self.offset[id(p)] + p.numel()
                if max(a, lo) < min(z, hi):
                    out.append((p, max(a, lo) - a, min(z, hi) - a))
        return out

    # ---- gradient reduction --------------------------------------------------------------------------

    def _reduce(self, b: _Bucket):
        full = self.buffer[b.start:b.end]
        if self.shard and not b.all_reduce:
            lo, hi = self.shard_range(b)
            return comm.reduce_scatter_flat_async(self.buffer[lo:hi], full, self.group)
        return comm.all_reduce_async(full, self.group)

    def _on_grad(self, p: torch.Tensor) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.work = self._reduce(bucket)

    @contextmanager
    def no_sync(self):
        """Accumulate locally; nothing is communicated (all micro-batches but the last)."""
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Wait for every bucket; buckets whose hooks did not fire under sync (e.g. gradients
        accumulated inside no_sync only, or parameters unused this step) are reduced now."""
        for bucket in self.buckets:
            if bucket.work is None and bucket.ready < len(bucket.params):
                bucket.work = self._reduce(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.ready = None, 0

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p in self.params:
            p.grad = None

    # ---- parameter all-gather (ZeRO-1) ---------------------------------------------------------------

    def gather_params(self, overlap: bool = False) -> None:
        """All-gather every rank's updated slices into the parameters; with `overlap` it only starts,
        and a module's first forward (see `overlap_param_gather`) or `wait_params` finishes it."""
        if not self.shard:
            return
        for b in self.buckets:
            lo, hi = self.shard_range(b)
            b.gather = comm.all_gather_flat_async(self.param_buffer[b.start:b.end], self.param_buffer[lo:hi],
                                                  self.group)
        if not overlap:
            self.wait_params()

    def wait_params(self, buckets=None) -> None:
        for b in self.buckets if buckets is None else buckets:
            if b.gather is not None:
                b.gather.wait()
                b.gather = None

    def overlap_param_gather(self, modules) -> None:
        """Pre-forward hooks: a module waits only for the buckets holding its own parameters, so the
        gather of later layers overlaps the forward of earlier ones."""
        for m in modules:
            mine = {id(self._bucket_of[id(p)]): self._bucket_of[id(p)] for p in m.parameters(recurse=False)
                    if id(p) in self._bucket_of}
            if mine:
                m.register_forward_pre_hook(lambda _m, _a, bs=list(mine.values()): self.wait_params(bs))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
