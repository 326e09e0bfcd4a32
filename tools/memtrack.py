"""Peak bytes of live tensors on a device that keeps no allocator statistics (CPU).

`LiveBytes` is a TorchDispatchMode: every op's output storages are counted from the moment an op
returns them until their last reference dies (a weakref finalizer on the storage), so `peak` is the
largest total of storages alive at once that were created while the mode was active: saved
activations, gradients in flight, communication buffers, optimizer temporaries. Scratch memory a
kernel allocates and frees internally is not seen, and neither are tensors that existed before.
On CUDA, torch.cuda.max_memory_allocated measures the same thing (plus the caching allocator's
rounding).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output that shares an input's storage (a view, an in-place or out= op) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                if st.data_ptr() not in inputs:
                    self._add(st)
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live:
            return
        self.live[key] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
