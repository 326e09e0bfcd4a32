"""The actor's weights as reshard pieces: every slice this rank holds, under its HF name.

engine/layout.py already knows where each rank's rows sit in every full HF tensor (fused QKV and
gate/up rows, row-parallel column blocks, KV heads shared by TP ranks, the last stage's copy of a tied
embedding); this turns that table into parallel.reshard.Piece records for the generation engine.
"""
from __future__ import annotations

from parallel.reshard import Piece


def local_pieces(chunks) -> list[Piece]:
    """Pieces of this rank's model chunks (a model or a list of pipeline chunks), views of the
    parameters (no copies)."""
    pieces = []
    for model in chunks if isinstance(chunks, list) else [chunks]:
        params = dict(model.named_parameters())
        for spec in model.shard_specs():
            local = params[spec.param].detach()
            if spec.rows is not None:
                local = local[spec.rows[0]:spec.rows[1]]
            pieces.append(Piece(spec.name, tuple(spec.shape), spec.dim, spec.start, spec.length, local, spec.owner))
    return pieces
