"""The actor's weights as reshard pieces: every slice this rank holds, under its HF name.

engine/layout.py already knows where each rank's rows sit in every full HF tensor (fused QKV and
gate/up rows, row-parallel column blocks, KV heads shared by TP ranks, the last stage's copy of a tied
embedding); this turns that table into parallel.reshard.Piece records for the generation engine.
"""
from __future__ import annotations

from parallel.reshard import Piece


def _piece(spec, param) -> Piece:
    """The spec's slice of `param` (a view, no copy) as a reshard piece."""
    local = param.detach()
    if spec.rows is not None:
        local = local[spec.rows[0]:spec.rows[1]]
    return Piece(spec.name, tuple(spec.shape), spec.dim, spec.start, spec.length, local, spec.owner)


def local_pieces(chunks) -> list[Piece]:
    """Pieces of this rank's model chunks (a model or a list of pipeline chunks), views of the
    parameters (no copies)."""
    pieces = []
    for model in chunks if isinstance(chunks, list) else [chunks]:
        params = dict(model.named_parameters())
        pieces += [_piece(spec, params[spec.param]) for spec in model.shard_specs()]
    return pieces


def adopt_parameters(target, chunks) -> int:
    """Let every parameter that can live in the shared reshard file live there (all of them at TP = 1;
    parallel.reshard.SharedTarget.adopt); returns how many moved. Call before taking `local_pieces`."""
    moved = 0
    for model in chunks if isinstance(chunks, list) else [chunks]:
        params = dict(model.named_parameters())
        by_param: dict[str, list] = {}
        for spec in model.shard_specs():
            by_param.setdefault(spec.param, []).append(spec)
        for name, specs in by_param.items():
            param = params[name]
            if any(s.rows is None for s in specs) and len(specs) > 1:
                continue  # the same whole parameter under several names (not one row block each)
            pieces = [_piece(s, param) for s in sorted(specs, key=lambda s: s.rows or (0, 0))]
            moved += target.adopt(param, pieces)
    return moved
