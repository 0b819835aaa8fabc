"""Peak tensor memory of a block of PyTorch code, counted from the tensors themselves.

On a GPU, ``torch.cuda.max_memory_allocated`` answers "how much memory did this training step
need". On CPU there is no such counter, and resident memory (RSS) is a poor stand-in: it holds
the interpreter, the libraries and whatever glibc's allocator keeps cached, and it grows with
the number of short-lived temporaries rather than with what is alive at once. This module
counts what the GPU counter counts: the bytes of tensor storages alive at the same moment, at
their peak, including activations recomputed by gradient checkpointing during backward.

Why hand-written: torch ships ``torch.distributed._tools.mem_tracker.MemTracker`` for this, but
it registers a gradient hook on every parameter and so raises on frozen ones, which is exactly
the LoRA case we measure. A dispatch mode that sees every op's outputs and a finaliser on every
storage is all that is needed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Count live tensor storages while active; ``peak`` is the most alive at once, in bytes.

    ``existing`` are tensors alive before the block that should count (weights, optimizer
    state, gradients): they are in ``current`` from the start. Storages are counted once
    however many tensors view them, from the op that made them until they are freed. Tensors
    made outside the block and not passed in are not seen, and in-place ops add nothing.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        for tensor in existing:
            self._count(tensor)

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = storage.data_ptr()
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._count(value)
        return out
