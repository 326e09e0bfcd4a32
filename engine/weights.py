"""Full HF-named tensors from a model sharded over TP, streamed in buckets to the first TP rank.

Used to hand the actor's weights to a generation engine after each update. Every rank knows where
every other rank's slices sit (engine/layout.py), so only the tensors travel, never metadata.
"""
from __future__ import annotations

from typing import Iterator

import torch

from engine.layout import shard_layout
from parallel import comm


def iter_full_tensors(model, bucket_bytes: int = 64 * 1024**2) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {hf_name: full tensor} buckets on TP rank 0 (nothing elsewhere); every TP rank must
    iterate it to the end, since each tensor is a collective over the TP group."""
    state, cfg = model.state, model.cfg
    params = dict(model.named_parameters())
    layouts = [shard_layout(cfg, state.tp, r, model.layer_ids, model.first, model.last) for r in range(state.tp)]
    bucket, size = {}, 0
    for i, spec in enumerate(layouts[state.tp_rank]):
        local = params[spec.param].detach()
        if spec.rows is not None:
            local = local[spec.rows[0]:spec.rows[1]]
        if spec.dim is None:
            full = local
        else:
            width = max(lay[i].length for lay in layouts)
            pad = [0, 0] * (local.ndim - spec.dim - 1) + [0, width - spec.length]
            parts = comm.gather_to_first(torch.nn.functional.pad(local, pad), state.tp_group)
            full = None
            if parts is not None:
                full = local.new_empty(spec.shape)
                for lay, part in zip(layouts, parts):
                    s = lay[i]
                    full.narrow(s.dim, s.start, s.length).copy_(part.narrow(s.dim, 0, s.length))
        if state.tp_rank == 0:
            bucket[spec.name] = full.contiguous()
            size += full.numel() * full.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = {}, 0
    if bucket:
        yield bucket
