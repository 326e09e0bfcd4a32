"""Resharding from the training layout to a generation engine on the same host, with no gathers.

The generation side (vLLM workers at any TP) loads *full* tensors under their checkpoint names and
cuts its own shards from them. So the target is one shared-memory file holding every full tensor at a
fixed offset, and each training rank writes exactly the slices it owns straight into it: a fused
QKV row block lands in the q/k/v tensors' rows, a row-parallel weight's column block lands through a
strided view. No rank gathers anything, no byte travels twice, and no rank ever holds more than its
own shard: bytes written per rank are the minimum (its share of one DP replica).

Pieces are (name, full shape, split dim or None, start, length, local tensor, owner) records; the
caller (engine/weights.py) builds them from its layout table, so nothing here knows the model.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from parallel import comm

ALIGN = 64


@dataclass
class Piece:
    name: str
    shape: tuple
    dim: int | None
    start: int
    length: int
    tensor: torch.Tensor
    owner: bool = True


def plan(metas: list[tuple[str, tuple, str]]) -> dict[str, tuple[str, list, int, int]]:
    """{name: (dtype, shape, byte offset, nbytes)} for (name, shape, dtype) in order, 64-byte aligned."""
    layout, offset = {}, 0
    for name, shape, dtype in metas:
        if name in layout:
            continue
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        layout[name] = (dtype, list(shape), offset, nbytes)
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout


def view(buf: torch.Tensor, entry) -> torch.Tensor:
    dtype, shape, offset, nbytes = entry
    return buf[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)


class SharedTarget:
    """One shared-memory file for a whole model, written in place by every owning rank.

    Collective over `group` (every rank of the training job): the first rank creates the file and
    the layout, every rank maps it. Call `write` on every rank, then the generation side reads.
    """

    def __init__(self, pieces: list[Piece], group, writer: bool = True):
        metas = [(p.name, tuple(p.shape), str(p.tensor.dtype).removeprefix("torch.")) for p in pieces if p.owner]
        everyone = comm.all_gather_object(metas, group)
        # in the ranks' piece order: the blocks of one parameter (q, k, v rows of a fused QKV) sit
        # next to each other, so a parameter can live in the file (see adopt)
        ordered = list({m[0]: m for rank_metas in everyone for m in rank_metas}.values())
        self.layout = plan(ordered)
        self.size = max((o + n for _, _, o, n in self.layout.values()), default=1)
        path = None
        if comm.rank_in(group) == 0:
            root = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="trident-reshard-", suffix=".bin", dir=root)
            os.close(fd)
            torch.from_file(path, shared=True, size=self.size, dtype=torch.uint8)  # sizes the file
        self.path = comm.broadcast_object(path, group)
        self.buf = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        self.group, self.writer = group, writer
        self.last_bytes = self.last_copied = 0

    def _destination(self, p: Piece) -> torch.Tensor:
        full = view(self.buf, self.layout[p.name])
        return full if p.dim is None else full.narrow(p.dim, p.start, p.length)

    def adopt(self, param: torch.Tensor, pieces: list[Piece]) -> bool:
        """Move `param`'s storage into the file when its pieces (consecutive row blocks of it, in
        order) are adjacent contiguous blocks there, as every parameter's are at TP = 1. The optimizer's
        writes then land in place and `write` has nothing to copy for it. Returns whether it moved."""
        if (not self.writer or not pieces or not all(p.owner for p in pieces) or not param.is_contiguous()
                or param.device.type != "cpu"):  # a device's parameters stay on the device
            return False
        regions = [self._destination(p) for p in pieces]
        ptr = regions[0].data_ptr()
        for r in regions:
            if not r.is_contiguous() or r.dtype != param.dtype or r.data_ptr() != ptr:
                return False
            ptr += r.numel() * r.element_size()
        if sum(r.numel() for r in regions) != param.numel():
            return False
        offset = regions[0].data_ptr() - self.buf.data_ptr()
        home = self.buf[offset:offset + param.numel() * param.element_size()].view(param.dtype).view(param.shape)
        home.copy_(param.detach())
        param.data = home
        return True

    def write(self, pieces: list[Piece]) -> int:
        """Copy this rank's owned slices into place (those of adopted parameters are there already);
        returns the bytes this rank contributes to the file."""
        written = copied = 0
        if self.writer:
            for p in pieces:
                if not p.owner or p.length == 0:
                    continue
                dst = self._destination(p)
                if dst.data_ptr() != p.tensor.data_ptr():
                    dst.copy_(p.tensor.reshape(dst.shape))
                    copied += p.tensor.numel() * p.tensor.element_size()
                written += p.tensor.numel() * p.tensor.element_size()
        comm.barrier(self.group)
        self.last_bytes, self.last_copied = written, copied
        return written

    def tensors(self) -> dict[str, torch.Tensor]:
        """Full tensors (views of the shared file) by name."""
        return {name: view(self.buf, entry) for name, entry in self.layout.items()}

    def model_bytes(self) -> int:
        return sum(n for *_, n in self.layout.values())

    def close(self) -> None:
        if comm.rank_in(self.group) == 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


# ---- over the network: the same pieces, sent by their owners to each engine worker ------------------

def wire_specs(pieces: list[Piece]) -> list[tuple]:
    """What a receiver needs to place one sender's pieces: (name, dtype, full shape, dim, start, length,
    nbytes) for every owned, non-empty piece, in the order they are sent."""
    return [(p.name, str(p.tensor.dtype).removeprefix("torch."), list(p.shape), p.dim, p.start, p.length,
             p.tensor.numel() * p.tensor.element_size()) for p in pieces if p.owner and p.length]


DIRECT_BYTES = 256 << 10


def messages(specs: list[tuple], bucket_bytes: int) -> list[tuple[int, int, bool]]:
    """How one sender's pieces go on the wire: (first, end, direct) ranges of its specs. A piece of at
    least DIRECT_BYTES travels alone and without a copy (from its parameter's storage into its place
    in the full tensor where that is contiguous: at ~4 GB/s its transfer already outweighs a message's
    ~50 us); smaller ones are packed together, up to bucket_bytes per message, so per-message latency
    does not add up over norms and biases. Sender and receiver cut them the same way, from the specs."""
    out, first, size = [], None, 0
    for i, spec in enumerate(specs):
        nbytes = spec[-1]
        if nbytes >= DIRECT_BYTES:
            if first is not None:
                out.append((first, i, False))
                first, size = None, 0
            out.append((i, i + 1, True))
            continue
        if first is not None and size + nbytes > bucket_bytes:
            out.append((first, i, False))
            first, size = None, 0
        first = i if first is None else first
        size += nbytes
    if first is not None:
        out.append((first, len(specs), False))
    return out


def _nbytes(specs) -> int:
    return sum(s[-1] for s in specs)


def _cuts(specs: list[tuple], need: dict | None):
    """(spec, index of the sender's piece, start within it) for what a receiver reads of each piece.
    `need` maps a tensor's name to the (dim, start, length) slab of the full tensor the receiver reads
    (a tensor-parallel worker's shard); a name not in it is read whole. A piece owned along that dim
    is cut to the overlap, and one that overlaps nothing is not sent; a whole piece is cut to the slab;
    a piece owned along another dim goes whole (Megatron and vLLM split the same dims, so only a
    foreign layout pays for that)."""
    for i, spec in enumerate(specs):
        name, dtype, shape, dim, start, length, nbytes = spec
        if not need or name not in need or (dim is not None and dim != need[name][0]):
            yield spec, i, None
            continue
        d, lo, n = need[name]
        first, end = (lo, lo + n) if dim is None else (max(start, lo), min(start + length, lo + n))
        if first < end:
            extent = shape[d] if dim is None else length
            yield ((name, dtype, shape, d, first, end - first, nbytes // extent * (end - first)), i,
                   first - (0 if dim is None else start))


def cut(specs: list[tuple], need: dict | None) -> list[tuple]:
    """The wire specs of what a receiver with this `need` takes of one sender's pieces (_cuts)."""
    return [spec for spec, _, _ in _cuts(specs, need)]


class WireSender:
    """Sends this rank's owned slices to receivers that rebuild full tensors (vLLM's workers:
    parallel.reshard.Receive), each receiver only the parts it reads. Each byte leaves its owner once
    per receiver that reads it; nothing is gathered; large slices go straight from the parameters,
    small ones through a reused staging buffer per distinct need."""

    def __init__(self, pieces: list[Piece], bucket_bytes: int = 16 << 20):
        self.pieces = [p for p in pieces if p.owner and p.length]
        self.specs = wire_specs(self.pieces)
        self.bucket_bytes = bucket_bytes
        self._plans: dict[str, tuple] = {}
        self.last_bytes = 0

    def _plan(self, need: dict | None) -> tuple[list, list, list, torch.Tensor]:
        """The cut specs, their tensors, messages and staging buffer for one need (made once)."""
        key = json.dumps(need, sort_keys=True)
        if key not in self._plans:
            cuts = list(_cuts(self.specs, need))
            specs = [spec for spec, _, _ in cuts]
            parts = [self.pieces[i].tensor if at is None else self.pieces[i].tensor.narrow(spec[3], at, spec[5])
                     for spec, i, at in cuts]
            plan = messages(specs, self.bucket_bytes)
            packed = sum(_nbytes(specs[a:b]) for a, b, direct in plan if not direct)
            device = self.pieces[0].tensor.device if self.pieces else torch.device("cpu")
            self._plans[key] = (specs, parts, plan, torch.empty(packed, dtype=torch.uint8, device=device))
        return self._plans[key]

    def start(self, link, dsts: list[int], needs: list[dict | None] | None = None) -> "Sends":
        """Start sending group rank dsts[k] what needs[k] reads (everything without needs) and return at
        once. The receivers take the bytes whenever they post their receives (before or after this);
        this rank's parameters must not change until the returned Sends are waited on."""
        groups: dict[str, tuple] = {}  # receivers that read the same get the same packed messages
        for k, dst in enumerate(dsts):
            need = needs[k] if needs else None
            groups.setdefault(json.dumps(need, sort_keys=True), (need, []))[1].append(dst)
        works, bufs, sent = [], [], 0
        for need, group in groups.values():
            specs, parts, plan, staging = self._plan(need)
            at = 0
            for tag, (first, end, direct) in enumerate(plan):
                if direct:
                    buf = parts[first].contiguous()
                else:
                    buf = staging[at:at + _nbytes(specs[first:end])]
                    at += buf.numel()
                    off = 0
                    for part in parts[first:end]:
                        n = part.numel() * part.element_size()
                        buf[off:off + n].view(part.dtype).view(part.shape).copy_(part)
                        off += n
                works += [link.send(buf, dst, tag) for dst in group]
                bufs.append(buf)  # a non-contiguous part's copy lives until its sends are done
                sent += buf.numel() * buf.element_size() * len(group)
        self.last_bytes = sent
        return Sends(works, bufs, sent)

    def send(self, link, dsts: list[int], needs: list[dict | None] | None = None) -> int:
        """start, then wait until the receivers have taken everything; returns the bytes this rank put
        on the wire."""
        return self.start(link, dsts, needs).wait()


@dataclass
class Sends:
    """A sender's messages in flight (WireSender.start)."""
    works: list
    bufs: list
    nbytes: int

    def wait(self) -> int:
        for work in self.works:
            work.wait()
        self.works, self.bufs = [], []
        return self.nbytes


class Receive:
    """One sync's receives of every sender's messages ((group rank, wire_specs) each) into full tensors;
    iterating yields (name, tensor) as soon as a tensor's last slice has landed, so a consumer (vLLM's
    layerwise `reload_weights`) can work while later messages are still on the wire.

    A tensor in `full` is received into (a buffer kept across syncs); any other is allocated on
    `device` when its first message is posted and forgotten once yielded. Receives are posted in
    windows of at most `window_bytes` of such new tensors (at least one message each), so a receiver
    holds a window's tensors and what its consumer keeps, not the whole model. `overlap` posts the
    next window before this one's tensors are yielded (the transfer runs under the consumer: NCCL);
    otherwise each window is drained before anything of it is yielded (gloo, whose receives are CPU
    work that would slow the consumer). A direct message lands in place when its destination is
    contiguous. `start` posts the first window now: the senders' bytes then land while the receiver
    does other work (generates), and iterating later only waits for what is still on the wire.
    `got` and `waited` count the bytes received and the seconds spent waiting on receives."""

    def __init__(self, link, senders: list[tuple[int, list[tuple]]], bucket_bytes: int, full: dict,
                 device=None, window_bytes: int | None = None, overlap: bool = True):
        self.link, self.full, self.device, self.overlap = link, full, device, overlap
        order = []  # (tag, src, first, end, direct, specs): waited in this order, so tensors complete early
        for src, specs in senders:
            order += [(tag, src, first, end, direct, specs) for tag, (first, end, direct) in
                      enumerate(messages(specs, bucket_bytes))]
        order.sort(key=lambda m: (m[0], m[1]))
        self.windows, new_bytes, seen = [[]], 0, set(full)
        for m in order:
            unseen = {spec[0]: spec for spec in m[5][m[2]:m[3]] if spec[0] not in seen}
            extra = sum(_full_bytes(spec) for spec in unseen.values())
            if window_bytes is not None and self.windows[-1] and new_bytes + extra > window_bytes:
                self.windows.append([])
                new_bytes = 0
            self.windows[-1].append(m)
            new_bytes += extra
            seen.update(unseen)
        self.missing: dict[str, int] = {}
        for _, _, first, end, _, specs in order:
            for spec in specs[first:end]:
                self.missing[spec[0]] = self.missing.get(spec[0], 0) + 1
        self.fresh: dict[str, torch.Tensor] = {}
        self.posted = None
        self.got, self.waited = 0, 0.0

    def start(self) -> "Receive":
        """Post the first window's receives now (all of them when everything fits one window)."""
        if self.posted is None:
            self.posted = self._post(self.windows[0])
        return self

    def _tensor(self, spec) -> torch.Tensor:
        name = spec[0]
        if name in self.full:
            return self.full[name]
        if name not in self.fresh:
            self.fresh[name] = torch.empty(spec[2], dtype=getattr(torch, spec[1]), device=self.device)
        return self.fresh[name]

    def _place(self, spec) -> torch.Tensor:
        _, _, _, dim, start, length, _ = spec
        return self._tensor(spec) if dim is None else self._tensor(spec).narrow(dim, start, length)

    def _post(self, window) -> list:
        out = []
        for tag, src, first, end, direct, specs in window:
            dst = self._place(specs[first]) if direct else None
            in_place = dst is not None and dst.is_contiguous()
            into = dst if in_place else torch.empty(_nbytes(specs[first:end]), dtype=torch.uint8, device=self.device)
            out.append((self.link.recv(into, src, tag), into, specs[first:end], in_place))
        return out

    def _land(self, work, into, specs, in_place) -> list:
        t0 = time.perf_counter()
        work.wait()
        self.waited += time.perf_counter() - t0
        at, done = 0, []
        for spec in specs:
            name, dtype, nbytes = spec[0], spec[1], spec[-1]
            if not in_place:
                dst = self._place(spec)
                dst.copy_(into[at:at + nbytes].view(getattr(torch, dtype)).view(dst.shape))
            at += nbytes
            self.missing[name] -= 1
            if not self.missing[name]:
                done.append((name, self.full[name] if name in self.full else self.fresh.pop(name)))
        self.got += into.numel() * into.element_size()
        return done

    def __iter__(self):
        posted, windows = self.start().posted, self.windows
        for k in range(len(windows)):
            ahead = self._post(windows[k + 1]) if self.overlap and k + 1 < len(windows) else None
            if self.overlap:
                for message in posted:
                    yield from self._land(*message)
            else:
                yield from [item for message in posted for item in self._land(*message)]
            posted = ahead if self.overlap or k + 1 == len(windows) else self._post(windows[k + 1])


def _full_bytes(spec) -> int:
    """Bytes of the full tensor a wire spec is a slice of."""
    _, dtype, shape, *_ = spec
    return math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
