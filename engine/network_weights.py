"""The network side of VLLMRollout's weight sync (transfer network): each training rank sends the
slices it owns to the workers of the engines its DP replica serves, over a transfer group per engine
that those workers join; an engine host has its workers receive them and reload (engine.vllm_worker).
A mixin: the rollout's placement, stores, links and sender are its own (engine/rollout.py)."""
from __future__ import annotations

import json

from engine.vllm_worker import vllm_tp_shards
from parallel import comm


class NetworkWeights:
    """VLLMRollout's network transfer: who sends to which engine, the links, sync and push."""

    def _replica(self, e: int) -> list[int]:
        """The training ranks (one DP replica: every TP x PP rank) that send engine e its weights; the
        replicas take turns, so DP spreads the senders' load."""
        d = e % self.dp
        return list(range(d * self.per, (d + 1) * self.per))

    def _transfer_link(self, e: int) -> comm.Link:
        if e not in self._links:
            addr, port = json.loads(self.store.get(f"trident/engine/{e}"))
            store = comm.tcp_store(addr, port, host=False, timeout_s=self.timeout_s)
            senders = self._replica(e)
            self._links[e] = comm.Link(store, f"trident/sync/{e}", self.place.tp_gen + senders.index(self.rank),
                                       self.place.tp_gen + len(senders), self.timeout_s,
                                       "nccl" if self.state.device.type == "cuda" else "gloo")
        return self._links[e]

    def _network_sync(self) -> None:
        receiving = None
        if self.engine is not None:  # the RPC blocks until the workers have it all: our own sends go meanwhile
            from concurrent.futures import ThreadPoolExecutor
            e = self.place.hosts.index(self.rank)
            if self._senders is None:  # what each sender sends never changes: read it once
                self._senders = [(self.place.tp_gen + i, json.loads(self.store.get(f"trident/specs/{r}")))
                                 for i, r in enumerate(self._replica(e))]
                self._engine_needs = vllm_tp_shards(self.hf_cfg, self.place.tp_gen,
                                                    {spec[0] for _, specs in self._senders for spec in specs})
            senders = self._senders
            addr, port = json.loads(self.store.get(f"trident/engine/{e}"))
            self._pool = self._pool or ThreadPoolExecutor(1)
            receiving = self._pool.submit(self.engine.receive, addr, port, f"trident/sync/{e}",
                                          self.place.tp_gen + len(senders), senders, self.bucket_bytes, self.timeout_s,
                                          self._engine_needs, self.window_bytes, self.ahead)
        sent = 0
        if self.rank < self.place.trainers:
            for e in self._served():
                try:
                    sending = self._pushed.pop(e, None) or self._start_sends(e)
                    sent += sending.wait()
                except RuntimeError as err:
                    raise RuntimeError(f"weight transfer to rollout engine {e} failed (rank {self.rank}, "
                                       f"timeout {self.timeout_s:.0f} s): {str(err).splitlines()[0]}") from None
        self.last_sync_bytes = sent
        if receiving is not None:
            try:
                self.last_engine_bytes = receiving.result(timeout=self.timeout_s)
            except Exception as err:
                e = self.place.hosts.index(self.rank)
                raise RuntimeError(f"rollout engine {e} did not take its weights within {self.timeout_s:.0f} s: "
                                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None

    def push(self, model) -> None:
        """Start sending the model's current weights to the engines now, without waiting (network
        transfer with `ahead`): each engine's workers posted their receives after their last reload,
        so the bytes land while the engines generate, and the next `sync` only waits for what is left
        and reloads. The model's parameters must not change before that sync."""
        if self.transfer != "network" or not self.ahead or self.rank >= self.place.trainers:
            return
        for e in self._served():
            if e not in self._pushed:
                self._pushed[e] = self._start_sends(e)

    def _served(self) -> list[int]:
        """The engines this training rank sends its slices to (its DP replica's turn)."""
        return [e for e in range(self.place.engines) if self.rank in self._replica(e)]

    def _start_sends(self, e: int):
        return self.sender.start(self._transfer_link(e), list(range(self.place.tp_gen)), self._needs)
