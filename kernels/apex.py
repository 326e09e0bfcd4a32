"""NVIDIA apex, when it is installed with its CUDA extensions (built from source; it is not on PyPI).

The PyPI package named `apex` is an unrelated web toolkit: it has no `apex.optimizers` or
`apex.normalization`, so it is never mistaken for NVIDIA's.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def nvidia_apex():
    """apex's module when NVIDIA's fused kernels import (FusedAdam, fused RMSNorm), else None."""
    try:
        import apex.normalization.fused_layer_norm as fused_norm
        import apex.optimizers
    except Exception:
        return None
    if not (hasattr(apex.optimizers, "FusedAdam") and hasattr(fused_norm, "fused_rms_norm_affine")):
        return None
    return apex
