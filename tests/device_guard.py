"""A dispatch mode that fails on any tensor a step creates off the run's device.

Inside `DeviceGuard(device)` every aten op must take and produce tensors on `device`. Allowed, because
they are how a device program talks to its host: host-to-device uploads (`.to(device)`, copies into
device tensors), host constants that are uploaded next (`torch.tensor(...)`; used on the host they
are caught by the op that uses them), device-to-host reads (`.item()`, `.tolist()`, `.cpu()`, a copy
into a host buffer), which are counted as syncs, as are ops whose output size depends on the data
(nonzero, masked_select, unique); and the 0-dim CPU seed / offset tensors of CUDA's fused attention
kernels (torch keeps its philox state on the host there). On the `meta` device (no data) the reads
return zeros (booleans False, other scalars 1), so a whole train step runs on CPU-only machines and
shows device propagation.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_HOST_CONSTANTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                   aten.unique_consecutive.default, aten.unique_dim.default}


class WrongDevice(RuntimeError):
    pass


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class DeviceGuard(TorchDispatchMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.syncs = torch.device(device), 0

    def _on(self, t) -> bool:
        d = t.device if isinstance(t, torch.Tensor) else torch.device(t)
        return d.type == self.device.type and (self.device.index is None or d.index in (None, self.device.index))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        meta = self.device.type == "meta"
        if func is aten._local_scalar_dense.default:  # .item(), float(t), bool(t)
            self.syncs += 1
            if meta:
                return False if args[0].dtype == torch.bool else 1
            return func(*args, **kwargs)
        if func in _HOST_CONSTANTS:
            return func(*args, **kwargs)
        if func is aten._to_copy.default:
            src, target = args[0], kwargs.get("device", args[0].device)
            if self._on(src) and torch.device(target).type == "cpu":  # a read back to the host
                self.syncs += 1
                if meta:
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
                return func(*args, **kwargs)
            if src.device.type == "cpu" and self._on(target):  # an upload
                return func(*args, **kwargs)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if self._on(dst) and (self._on(src) or src.device.type == "cpu"):  # an upload, or on the device
                return func(*args, **kwargs)
            if dst.device.type == "cpu" and self._on(src):  # a read into a host (e.g. pinned) buffer
                self.syncs += 1
                return dst if meta else func(*args, **kwargs)
        if func in _DATA_DEPENDENT:
            self.syncs += 1
        attention = "attention" in str(func)  # CUDA SDPA kernels pass 0-dim CPU philox seed / offset tensors
        bad = [t for t in _tensors((args, kwargs)) if not self._on(t) and not (attention and t.dim() == 0)]
        if bad:
            raise WrongDevice(f"{func} takes a {bad[0].device} tensor {tuple(bad[0].shape)} inside a "
                              f"{self.device} step")
        out = func(*args, **kwargs)
        bad = [t for t in _tensors(out) if not self._on(t) and not (attention and t.dim() == 0)]
        if bad:
            raise WrongDevice(f"{func} created a {bad[0].device} tensor {tuple(bad[0].shape)} inside a "
                              f"{self.device} step")
        return out
