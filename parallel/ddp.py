"""Data parallelism: gradients summed over the data-parallel group, overlapped with backward.

Every gradient accumulates into one contiguous fp32 buffer (`param.main_grad` is a view into it;
`param.grad` is emptied as soon as autograd produces it), so accumulation over micro-batches is exact
in fp32 whatever the parameter dtype. The buffer is cut into buckets in reverse parameter order (the
order backward produces gradients); when every gradient of a bucket is final, a post-accumulate-grad
hook starts its all-reduce asynchronously, so communication overlaps the rest of the backward pass.
`no_sync()` (all micro-batches but the last) sends nothing. With a group of None (one DP rank) it is
only the fp32 gradient buffer: the same code, no communication.

Gradients are *summed*: losses must be normalised by the global batch (all DP ranks), as trident's
are (token counts and PPO statistics are all-reduced before the loss is formed).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from parallel import comm


class _Bucket:
    def __init__(self, view: torch.Tensor, params: list):
        self.view, self.params, self.ready, self.work = view, params, 0, None


class DistributedDataParallel:
    def __init__(self, params, group, bucket_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.sync_enabled = True
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else None
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        limit = int(bucket_mb * 1024**2 / 4)
        offset, start, members = 0, 0, []
        for p in reversed(self.params):
            p.main_grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            members.append(p)
            if offset - start >= limit or p is self.params[0]:
                self._add_bucket(start, offset, members)
                start, members = offset, []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _add_bucket(self, start: int, end: int, members: list) -> None:
        bucket = _Bucket(self.buffer[start:end], members)
        self.buckets.append(bucket)
        for p in members:
            self._bucket_of[id(p)] = bucket

    def _on_grad(self, p: torch.Tensor) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.work = comm.all_reduce_async(bucket.view, self.group)

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
                bucket.work = comm.all_reduce_async(bucket.view, self.group)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work, bucket.ready = None, 0

    def zero_grad(self) -> None:
        self.buffer.zero_()
        for p in self.params:
            p.grad = None
