"""Spawn targets for pipeline tests: a chain of Linear+tanh blocks split into stages / chunks."""
import torch

from parallel.pipeline import PipelineJob, build_order, partition_layers, run_pipeline
from parallel.state import build_state

WIDTH, BLOCKS, MB, ROWS = 8, 8, 8, 3


class Chunk(torch.nn.Module):
    """Blocks `ids` of the chain; the first chunk reads the micro-batch, later ones their received input."""

    def __init__(self, ids, seed=0):
        super().__init__()
        self.ids = list(ids)
        self.blocks = torch.nn.ModuleList()
        for i in self.ids:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            lin = torch.nn.Linear(WIDTH, WIDTH)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g) * 0.5)
                lin.bias.copy_(torch.randn(WIDTH, generator=g) * 0.1)
            self.blocks.append(lin)
        self.input = None

    def set_input_tensor(self, x):
        self.input = x

    def forward(self, x):
        x = x if self.ids[0] == 0 else self.input
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def micro_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(ROWS, WIDTH, generator=g), "y": torch.randn(ROWS, WIDTH, generator=g)}
            for _ in range(MB)]


def forward_step(chunk, mb):
    out = chunk(mb["x"])

    def loss_fn(out):
        loss = (out - mb["y"]).square().mean() / MB
        return loss, {"loss": loss.item()}

    return out, loss_fn


def serial(seed=0, models=1):
    """Grads and losses of the whole chain on one process (the reference)."""
    out = []
    for k in range(models):
        chain = Chunk(range(BLOCKS), seed=k)
        losses = []
        for mb in micro_batches(seed + k):
            o, fn = forward_step(chain, mb)
            loss, st = fn(o)
            loss.backward()
            losses.append(st["loss"])
        out.append(({f"{i}.{n}": p.grad for i, blk in zip(chain.ids, chain.blocks) for n, p in blk.named_parameters()},
                    losses))
    return out


def pipelined(rank, world, schedule, v=1, split=None, models=1):
    state = build_state(rank, tp=1, pp=world, dp=1, device=torch.device("cpu"))
    stages = partition_layers(BLOCKS, world * v, split)
    jobs = []
    for k in range(models):
        chunks = [Chunk(stages[c * world + rank], seed=k) for c in range(v)]
        jobs.append(PipelineJob(chunks, forward_step, micro_batches(k)))
    order = build_order(schedule, MB, world, rank, v, models)
    stats = run_pipeline(order, jobs, state, lambda mb: (ROWS, WIDTH), torch.float32)
    return [({f"{i}.{n}": p.grad for c in job.chunks for i, blk in zip(c.ids, c.blocks) for n, p in blk.named_parameters()},
             [s["loss"] for s in st]) for job, st in zip(jobs, stats)]


def ddp_buckets(rank, world):
    """Two micro-batches under DDP: nothing sent during the first; every bucket's all-reduce started
    by hooks during the second backward (before finish_grad_sync); the result is the sum over ranks."""
    from parallel.ddp import DistributedDataParallel
    state = build_state(rank, 1, 1, world, torch.device("cpu"))
    chain = Chunk(range(BLOCKS))
    ddp = DistributedDataParallel(list(chain.parameters()), state.dp_group, bucket_mb=0.0005)
    mbs = micro_batches(seed=rank)

    def backward(mb):
        out, loss_fn = forward_step(chain, mb)
        loss_fn(out)[0].backward()

    with ddp.no_sync():
        backward(mbs[0])
    started_early = any(b.work is not None for b in ddp.buckets)
    backward(mbs[1])
    started = [b.work is not None for b in ddp.buckets]
    ddp.finish_grad_sync()
    return started_early, started, len(ddp.buckets), {n: p.main_grad.clone() for n, p in chain.named_parameters()}
