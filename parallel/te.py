"""Transformer Engine backend for FP8: trident's column / row parallel layers handed to TE's Linear.

Imported only when precision fp8 resolves to backend te (CUDA with transformer_engine.pytorch). TE's
Linear (parallel_mode column / row, tp_group, sequence_parallel) does the layer's TP / SP
communication itself and runs its GEMMs in FP8 under te.fp8_autocast (PrecisionPolicy.autocast). The
TE module gets the layer's current weights and the layer's `weight` / `bias` become TE's parameters,
so names, checkpoints, replicas and the optimizer see one set of parameters.
"""
from __future__ import annotations

import torch

from parallel import comm


def arm_te_linear(layer: torch.nn.Module) -> None:
    import transformer_engine.pytorch as te

    from parallel.errors import ConfigError
    if layer.sequence_parallel:
        # TE splits the sequence along dim 0 ([s, b, h]); trident's activations are [b, s, h]
        raise ConfigError("fp8.backend=te with sequence parallelism is not supported (TE's layout is sequence-first); "
                          "use fp8.backend=torch or parallel.sequence_parallel=false")
    w = layer.weight
    tp = comm.world(layer.group)
    rows, cols = w.shape
    out_features, in_features = (rows * tp, cols) if layer.parallel_mode == "column" else (rows, cols * tp)
    module = te.Linear(in_features, out_features, bias=layer.bias is not None, tp_group=layer.group, tp_size=tp,
                       parallel_mode=layer.parallel_mode, sequence_parallel=layer.sequence_parallel,
                       params_dtype=w.dtype, device=w.device)
    with torch.no_grad():
        module.weight.copy_(w)
        if layer.bias is not None:
            module.bias.copy_(layer.bias)
    for old, new in ((w, module.weight), (layer.bias, module.bias if layer.bias is not None else None)):
        if old is not None and hasattr(old, "replica"):
            new.replica = old.replica
    layer.te = module
    layer.weight = module.weight
    if layer.bias is not None:
        layer.bias = module.bias
