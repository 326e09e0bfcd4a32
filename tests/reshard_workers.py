"""Spawn target: a TP2 x PP2 actor resharded into vLLM (TP 1 or 2) on the same host."""
import torch

from engine.checkpoint import RandomSource, load_into
from engine.rollout import VLLMRollout
from engine.sampler import SamplingParams
from engine.build import build_chunks
from engine.config import ParallelConfig
from parallel.precision import PARAM_DTYPES
from parallel.reshard import Piece
from parallel.state import build_state


def shared_file_with_adoption(rank, world, cfg, tp, dtype):
    """The shared file as the rollout fills it (parameters adopted where possible, then updated in
    place like an optimizer step) against a plain target written from copies of the same weights."""
    from engine.weights import adopt_parameters, local_pieces
    from parallel.reshard import SharedTarget

    state = build_state(rank, tp, 1, world // tp, torch.device("cpu"))
    model = build_chunks(RandomSource(cfg, seed=0), cfg, ParallelConfig(tp=tp), state, PARAM_DTYPES[dtype])[0]
    target = SharedTarget(local_pieces(model), state.tp_group)
    before = [p.detach().clone() for p in model.parameters()]
    moved = adopt_parameters(target, model)
    kept = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    pieces = local_pieces(model)
    target.write(pieces)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(0.5).add_(i)  # in place, as the optimizer writes
    written = target.write(pieces)
    copied = target.last_copied
    plain = SharedTarget(local_pieces([model]), state.tp_group)
    plain.write([Piece(**{**vars(p), "tensor": p.tensor.clone()}) for p in local_pieces(model)])
    same = {n: torch.equal(t, plain.tensors()[n]) for n, t in target.tensors().items()}
    out = {"moved": moved, "kept": kept, "params": len(list(model.parameters())), "written": written, "copied": copied,
           "same": same, "names": sorted(target.tensors()) == sorted(plain.tensors())}
    target.close()
    plain.close()
    return out


def vllm_after_network_sync(rank, world, cfg, prompts, layouts):
    """TP2 x PP2 into colocated engines for each (engines, tp_gen, transfer, receive window MB) in turn:
    greedy and sampled output after an update, and the bytes each rank sent (wrote) and each engine
    received; then a second update pushed ahead (sent while the engines generate with the first
    update's weights), and greedy output before and after its sync."""
    state = build_state(rank, 2, 2, world // 4, torch.device("cpu"))
    chunks = build_chunks(RandomSource(cfg, seed=0), cfg, ParallelConfig(tp=2, pp=2), state, torch.float32)
    results = []
    for engines, tp_gen, transfer, window_mb in layouts:
        for c in chunks:
            load_into(c, RandomSource(cfg, seed=0))
        vllm = VLLMRollout(chunks, 2, max_model_len=cfg.max_position_embeddings, tp_gen=tp_gen, engines=engines,
                           transfer=transfer, bucket_mb=1, window_mb=window_mb)
        try:
            for c in chunks:  # an "update": new weights everywhere, then the in-place sync
                load_into(c, RandomSource(cfg, seed=1))
            seconds = vllm.sync(chunks)
            greedy = vllm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
            sampled = vllm.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=3))
            sent, received = vllm.last_sync_bytes, vllm.last_engine_bytes
            for c in chunks:
                load_into(c, RandomSource(cfg, seed=2))
            vllm.push(chunks)
            under_push = vllm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
            vllm.sync(chunks)
            pushed = vllm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
            results.append({"responses": greedy.responses, "sampled": sampled.responses, "logprobs": sampled.logprobs,
                            "under_push": under_push.responses, "pushed": pushed.responses,
                            "sent": sent, "received": received, "pushed_sent": vllm.last_sync_bytes,
                            "owned": sum(s[-1] for s in vllm.sender.specs) if transfer == "network" else None,
                            "model_bytes": vllm.target.model_bytes() if transfer == "shm" else None,
                            "host": vllm.engine is not None,
                            "transfer": vllm.transfer, "sync_s": seconds})
        finally:
            vllm.close()
    return results
