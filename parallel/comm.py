"""Every collective in trident goes through here, plus the autograd region ops of Megatron.

A group of None means "size 1": every op is then the identity, so single-process code runs the same
path as the parallel one. Region ops (names as in Megatron-core):

  copy_to_tensor_model_parallel_region      fwd identity        bwd all-reduce
  reduce_from_tensor_model_parallel_region  fwd all-reduce      bwd identity
  scatter_to_tensor_model_parallel_region   fwd split last dim  bwd all-gather last dim
  gather_from_tensor_model_parallel_region  fwd all-gather last bwd split last dim
  gather_from_sequence_parallel_region      fwd all-gather seq  bwd reduce-scatter seq
  reduce_scatter_to_sequence_parallel_region fwd reduce-scatter bwd all-gather seq
  scatter_to_sequence_parallel_region       fwd split seq       bwd all-gather seq

Tensors here are [batch, seq, hidden]: the sequence dim is 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def rank_in(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- plain collectives (no autograd) ---------------------------------------------------------------

def all_reduce(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """In place; returns t. op is sum, max or min."""
    if world(group) > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                "min": dist.ReduceOp.MIN}[op], group=group)
    return t


def all_gather(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = world(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=dim)


def broadcast_object(obj, group, src_in_group: int = 0):
    """A picklable object from the group's src rank to all of its ranks."""
    if world(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=group, group_src=src_in_group)
    return box[0]


def all_gather_object(obj, group) -> list:
    """Every rank's picklable object, in group-rank order."""
    if world(group) == 1:
        return [obj]
    out = [None] * world(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def split(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of t along dim (no communication)."""
    n = world(group)
    if n == 1:
        return t
    if t.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} does not divide by group size {n}")
    return t.chunk(n, dim=dim)[rank_in(group)].contiguous()


def reduce_scatter(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = world(group)
    if n == 1:
        return t
    parts = [p.contiguous() for p in t.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def broadcast(t: torch.Tensor, group, src_in_group: int = 0) -> torch.Tensor:
    if world(group) > 1:
        dist.broadcast(t, group=group, group_src=src_in_group)
    return t


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def all_reduce_async(t: torch.Tensor, group):
    """Start an in-place sum all-reduce; returns a handle to `.wait()` on (None when nothing to do)."""
    if world(group) == 1:
        return None
    return dist.all_reduce(t, group=group, async_op=True)


def reduce_scatter_flat_async(shard: torch.Tensor, full: torch.Tensor, group):
    """Start a sum reduce-scatter of a 1-D `full` (size divisible by the group) into this rank's
    `shard`, which may be the rank's own slice of `full` (in place, as the distributed optimizer
    uses it); returns a handle to `.wait()` on (None when nothing to do)."""
    if world(group) == 1:
        return None
    op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return op(shard, full, group=group, async_op=True)


def all_gather_flat_async(full: torch.Tensor, shard: torch.Tensor, group):
    """Start an all-gather of every rank's 1-D `shard` into `full` (in place when `shard` is this
    rank's slice of it); returns a handle to `.wait()` on (None when nothing to do)."""
    if world(group) == 1:
        return None
    op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return op(full, shard, group=group, async_op=True)


# ---- point to point (pipeline stages; peers are global ranks) ---------------------------------------

def p2p(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]]) -> list:
    """Post (tensor, peer, tag) sends and receives as one batched isend/irecv; returns the send
    handles (wait or poll them before reusing the tensors). Receives are complete on return."""
    ops = [dist.P2POp(dist.isend, t, peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, tag=tag) for t, peer, tag in recvs]
    if not ops:
        return []
    works = dist.batch_isend_irecv(ops)
    for w in works[len(sends):]:
        w.wait()
    return works[: len(sends)]


# ---- links: groups outside the training world ------------------------------------------------------

def tcp_store(addr: str, port: int, host: bool, timeout_s: float = 300):
    """A TCP key-value store: `host` serves it on addr:port (port 0 picks a free one: read `.port`)."""
    import datetime

    return dist.TCPStore(addr, port, is_master=host, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class Link:
    """A process group of its own on a TCP store, whose members need not share torch.distributed's
    default world: the trainers and the hosts of separate rollout engines, or the trainers and vLLM's
    worker processes. Ops take group ranks. Each op times out after `timeout_s`, and a peer that dies
    fails the ops waiting on it at once (its connection closes)."""

    def __init__(self, store, prefix: str, rank: int, size: int, timeout_s: float = 300, backend: str = "gloo"):
        import datetime

        self.rank, self.size, self.timeout_s, self.prefix, self.backend = rank, size, timeout_s, prefix, backend
        scoped = dist.PrefixStore(prefix, store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = datetime.timedelta(seconds=timeout_s)
            self.pg = dist.ProcessGroupNCCL(scoped, rank, size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(scoped, rank, size, datetime.timedelta(seconds=timeout_s))

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        if self.size > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = src
            self.pg.broadcast([t], opts).wait()
        return t

    def send(self, t: torch.Tensor, dst: int, tag: int = 0):
        """Start sending t to group rank dst; returns the work to `.wait()` on before reusing t."""
        return self.pg.send([t], dst, tag)

    def recv(self, t: torch.Tensor, src: int, tag: int = 0):
        """Start receiving into t from group rank src; returns the work to `.wait()` on."""
        return self.pg.recv([t], src, tag)


# ---- autograd region ops ---------------------------------------------------------------------------

class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous().clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.group, ctx.dim), None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.group, SEQ_DIM), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, SEQ_DIM), None


def _active(group) -> bool:
    return world(group) > 1


def copy_to_tensor_model_parallel_region(x, group):
    return _Copy.apply(x, group) if _active(group) else x


def reduce_from_tensor_model_parallel_region(x, group):
    return _Reduce.apply(x, group) if _active(group) else x


def scatter_to_tensor_model_parallel_region(x, group):
    return _Scatter.apply(x, group, -1) if _active(group) else x


def gather_from_tensor_model_parallel_region(x, group):
    return _Gather.apply(x, group, -1) if _active(group) else x


def scatter_to_sequence_parallel_region(x, group):
    return _Scatter.apply(x, group, SEQ_DIM) if _active(group) else x


def gather_from_sequence_parallel_region(x, group, tensor_parallel_output_grad: bool = True):
    """tensor_parallel_output_grad=False when what consumes the gathered tensor is replicated on every
    rank (e.g. a value head): its gradient is then already complete, so backward just splits it."""
    if not _active(group):
        return x
    return _GatherSeq.apply(x, group) if tensor_parallel_output_grad else _Gather.apply(x, group, SEQ_DIM)


def reduce_scatter_to_sequence_parallel_region(x, group):
    return _ReduceScatterSeq.apply(x, group) if _active(group) else x
