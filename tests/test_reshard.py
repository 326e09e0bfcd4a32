"""The shared reshard file with the actor's parameters living in it (no vLLM needed)."""
import pytest

from engine.config import ModelConfig
from tests import reshard_workers
from tests.distributed import run_ranks

CFG = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_tp1_parameters_live_in_the_file_and_a_sync_copies_nothing(dtype):
    out = reshard_workers.shared_file_with_adoption(0, 1, CFG, 1, dtype)
    assert out["moved"] == out["params"] and out["kept"]
    assert out["copied"] == 0 and out["written"] > 0
    assert out["names"] and all(out["same"].values()), [n for n, ok in out["same"].items() if not ok]


def test_tp2_adopts_what_is_contiguous_and_copies_the_rest():
    for rank in run_ranks(2, reshard_workers.shared_file_with_adoption, CFG, 2, "bf16"):
        assert 0 < rank["moved"] < rank["params"] and rank["kept"]  # whole-row blocks move; q/k/v and column blocks do not
        assert 0 < rank["copied"] < rank["written"]
        assert rank["names"] and all(rank["same"].values()), [n for n, ok in rank["same"].items() if not ok]


def test_vllm_cpu_binding_shares_the_cores_and_leaves_the_environment_alone(monkeypatch):
    import os

    from engine.vllm_engine import _env_defaults, cpu_binding
    assert cpu_binding(1, cores=[0, 1]) == "0,1"
    assert cpu_binding(2, cores=[0, 1]) == "0|1"
    assert cpu_binding(2, cores=[0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_binding(4, cores=[0, 1]) == "0|1|0|1"  # fewer cores than ranks: they share
    assert cpu_binding(1, reserve=1, cores=[0, 1]) == "0"  # one core left to vLLM's scheduler
    assert cpu_binding(2, reserve=1, cores=[0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_binding(1, reserve=4, cores=[0, 1]) == "0"  # never fewer than one
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with _env_defaults({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1"}):
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"  # the user's setting wins
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # the next engine (another TP size) sets its own


def test_each_receiver_is_sent_only_the_shard_it_reads():
    """WireSender to reshard.Receive over one gloo link (four threads of this process): two training
    ranks own row halves of W and A and column halves of B, and the norm N and embedding E whole; two
    receivers (vLLM TP workers) read row and column ranges that straddle the owners' cut. What each
    receiver reads equals the full tensor there, and it was sent the overlaps only, by their owners."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from parallel import comm
    from parallel.reshard import Piece, Receive, WireSender, cut, wire_specs

    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(*s, generator=g) for n, s in
            (("W", (512, 512)), ("A", (8, 6)), ("B", (6, 8)), ("N", (6,)), ("E", (10, 6)))}
    owned = [{"W": (0, 0, 256), "A": (0, 0, 4), "B": (1, 0, 4), "N": None},
             {"W": (0, 256, 256), "A": (0, 4, 4), "B": (1, 4, 4), "E": None}]
    needs = [{"W": (0, 0, 384), "A": (0, 0, 5), "B": (1, 0, 4), "E": (0, 0, 6)},
             {"W": (0, 384, 128), "A": (0, 5, 3), "B": (1, 4, 4), "E": (0, 6, 4)}]
    pieces = [[Piece(n, tuple(full[n].shape), None, 0, full[n].shape[0], full[n]) if at is None else
               Piece(n, tuple(full[n].shape), *at, full[n].narrow(*at).clone()) for n, at in mine.items()]
              for mine in owned]
    specs = [wire_specs(p) for p in pieces]
    # a piece owned along another dim than the one read goes whole; one outside the read range not at all
    assert cut(specs[0], {"A": (1, 0, 3)}) == specs[0]
    assert [s[0] for s in cut(specs[1], {"W": (0, 0, 256), "A": (0, 0, 4)})] == ["B", "E"]

    store = comm.tcp_store("127.0.0.1", 0, host=True, timeout_s=60)

    def member(rank):
        link = comm.Link(comm.tcp_store("127.0.0.1", store.port, host=False, timeout_s=60), "t", rank, 4, 60)
        if rank >= 2:  # a training rank
            return WireSender(pieces[rank - 2], bucket_bytes=1 << 10).send(link, [0, 1], needs)
        into = {n: torch.zeros_like(t) for n, t in full.items()}
        receiving = Receive(link, [(2 + s, cut(specs[s], needs[rank])) for s in (0, 1)], 1 << 10, into)
        done = [n for n, _ in receiving]
        return into, done, receiving.got

    with ThreadPoolExecutor(4) as pool:
        *sent, r0, r1 = [f.result(timeout=120) for f in [pool.submit(member, r) for r in (2, 3, 0, 1)]]
    received = [r0, r1]
    for need, (into, done, got) in zip(needs, received):
        assert sorted(done) == sorted(full)
        for n, t in full.items():
            at = need.get(n)
            assert torch.equal(into[n] if at is None else into[n].narrow(*at), t if at is None else t.narrow(*at)), n
        assert got == 4 * sum(full[n].narrow(*need[n]).numel() if n in need else full[n].numel() for n in full)
    assert sum(sent) == sum(got for _, _, got in received)


@pytest.mark.parametrize("window_kb, overlap, most_kb", [(128, False, 128), (128, True, 256), (None, False, 384)])
def test_a_receiver_without_a_buffer_holds_a_window_of_full_tensors_not_the_model(window_kb, overlap, most_kb):
    """Six 64 KB tensors, each owned half and half by two training ranks, reach a receiver that keeps no
    buffer: the bytes it has posted receives for but not yet handed to its consumer stay within one
    window (two with overlap: the next is posted under the consumer); without a window, the model."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from parallel import comm
    from parallel.reshard import Piece, Receive, WireSender, wire_specs

    full = {f"T{i}": torch.randn(64, 256, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    pieces = [[Piece(n, (64, 256), 0, 32 * s, 32, t.narrow(0, 32 * s, 32).clone()) for n, t in full.items()]
              for s in (0, 1)]
    store = comm.tcp_store("127.0.0.1", 0, host=True, timeout_s=60)

    class Recording(comm.Link):  # what a window means to a receiver: posted, not yet consumed
        def recv(self, t, src, tag=0):
            events.append(t.numel() * t.element_size())
            return super().recv(t, src, tag)

    events: list[int] = []

    def member(rank):
        kind = Recording if rank == 0 else comm.Link
        link = kind(comm.tcp_store("127.0.0.1", store.port, host=False, timeout_s=60), "w", rank, 3, 60)
        if rank:
            return WireSender(pieces[rank - 1], bucket_bytes=40 << 10).send(link, [0])
        window = None if window_kb is None else window_kb << 10
        got = {}
        for name, t in Receive(link, [(1 + s, wire_specs(pieces[s])) for s in (0, 1)], 40 << 10, {},
                               window_bytes=window, overlap=overlap):
            events.append(-t.numel() * t.element_size())
            got[name] = t.clone()
        return got

    with ThreadPoolExecutor(3) as pool:
        got, *_ = [f.result(timeout=120) for f in [pool.submit(member, r) for r in (0, 1, 2)]]
    assert sorted(got) == sorted(full) and all(torch.equal(got[n], full[n]) for n in full)
    outstanding = [sum(events[:i + 1]) for i in range(len(events))]
    assert max(outstanding) == most_kb << 10, max(outstanding) >> 10


def test_receives_posted_ahead_take_the_bytes_before_the_receiver_waits():
    """A receiver that posts its receives ahead (Receive.start, as an engine worker does after each
    reload) takes two senders' 4 MB of slices while it is busy elsewhere: both senders' sends complete
    before the receiver looks at them, and what it then yields, without waiting, is the senders' data.
    Two rounds into one kept buffer, as successive weight syncs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from parallel import comm
    from parallel.reshard import Piece, Receive, WireSender, wire_specs

    rounds = [{f"T{i}": torch.randn(512, 512, generator=torch.Generator().manual_seed(10 * r + i)) for i in range(2)}
              for r in range(2)]
    full = {n: torch.zeros(512, 512) for n in rounds[0]}
    store = comm.tcp_store("127.0.0.1", 0, host=True, timeout_s=60)
    sent = [threading.Event() for _ in range(2)]
    posted = [threading.Event() for _ in range(2)]

    def pieces(s, r):
        return [Piece(n, (512, 512), 0, 256 * s, 256, t.narrow(0, 256 * s, 256).clone()) for n, t in rounds[r].items()]

    def member(rank):
        link = comm.Link(comm.tcp_store("127.0.0.1", store.port, host=False, timeout_s=60), "a", rank, 3, 60)
        if rank:
            for r in range(2):
                posted[r].wait(30)
                sender = WireSender(pieces(rank - 1, r), bucket_bytes=1 << 20)
                sender.start(link, [0]).wait()  # returns once the receiver has taken everything
                sent[r].set()
            return None
        specs = [(1 + s, wire_specs(pieces(s, 0))) for s in (0, 1)]
        out = []
        for r in range(2):
            into = Receive(link, specs, 1 << 20, full).start()
            posted[r].set()
            both_sent = sent[r].wait(30)  # the receiver does other work meanwhile
            done = {n: t.clone() for n, t in into}
            out.append((both_sent, done, into.got))
        return out

    with ThreadPoolExecutor(3) as pool:
        got, *_ = [f.result(timeout=120) for f in [pool.submit(member, r) for r in (0, 1, 2)]]
    for (both_sent, done, nbytes), expect in zip(got, rounds):
        assert both_sent
        assert sorted(done) == sorted(expect) and all(torch.equal(done[n], expect[n]) for n in expect)
        assert nbytes == 2 * 512 * 512 * 4
