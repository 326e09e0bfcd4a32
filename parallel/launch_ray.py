"""Ray as a launcher (OpenRLHF's design): every rank is a Ray actor placed in a placement group of its
role (the trainers, the rollout engines), started with the environment torchrun would give it, so it
runs the same code. Ray is optional (`pip install .[ray]`); without an address this starts a local
cluster. A rank that dies or fails ends the run: the driver kills the others and names it.

`fn` is "module:function", called as fn(*args) in every rank; results come back in rank order.
"""
from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankDied(RuntimeError):
    pass


def run(fn: str, args: tuple, groups: list[tuple[str, int]], cpus_per_rank: float = 1, gpus_per_rank: float = 0,
        address: str | None = None, timeout_s: float | None = None) -> list:
    """Run `fn` on sum(sizes) ranks, the ranks of each (role, size) in `groups` packed into one
    placement group of their own, in order (rank 0 is the first group's first bundle)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = sum(n for _, n in groups)
    if not ray.is_initialized():
        local = address is None
        ray.init(address=address, num_cpus=max(world * cpus_per_rank, os.cpu_count() or 1) if local else None,
                 include_dashboard=False, log_to_driver=True)
    bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
    pgs = [placement_group([bundle] * n, strategy="PACK", name=f"trident-{role}") for role, n in groups if n]
    ray.get([pg.ready() for pg in pgs], timeout=timeout_s)

    @ray.remote(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank)
    class Rank:
        def where(self):
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), _free_port()

        def run(self, env: dict, fn: str, args: tuple):
            import importlib

            os.environ.update(env)
            module, name = fn.split(":")
            return getattr(importlib.import_module(module), name)(*args)

    roles, actors = [], []
    for pg, (role, n) in zip(pgs, [g for g in groups if g[1]]):
        for i in range(n):
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
            actors.append(Rank.options(scheduling_strategy=strategy).remote())
            roles.append(role)
    places = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
    master_addr, master_port = places[0][1], places[0][2]
    per_node: dict[str, list[int]] = {}
    for rank, (node, _, _) in enumerate(places):
        per_node.setdefault(node, []).append(rank)
    refs = []
    for rank, (actor, (node, _, _)) in enumerate(zip(actors, places)):
        env = {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
               "LOCAL_RANK": str(per_node[node].index(rank)), "LOCAL_WORLD_SIZE": str(len(per_node[node]))}
        refs.append(actor.run.remote(env, fn, args))
    results: dict[int, object] = {}
    try:
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                raise TimeoutError(f"the ranks did not finish within {timeout_s:.0f} s")
            for ref in ready:
                rank = refs.index(ref)
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    raise RankDied(f"rank {rank} ({roles[rank]}) died: {_first_line(err)}") from None
                except ray.exceptions.RayTaskError as err:
                    raise RankDied(f"rank {rank} ({roles[rank]}) failed: {_first_line(err.cause or err)}") from None
    finally:
        for actor in actors:
            ray.kill(actor)
        for pg in pgs:
            remove_placement_group(pg)
    return [results[r] for r in range(world)]


def _first_line(err) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
