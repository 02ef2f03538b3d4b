"""Counting the host synchronisations a piece of code would make on an accelerator, on the CPU.

Two instruments, no ``torch.cuda``: the ``Tensor`` methods that hand a value to Python (``item``,
``bool()``, ``int()``, ``float()``, indices, ``tolist``, ``cpu``, ``numpy``) are wrapped, and a
dispatch mode counts the aten ops whose output shape or value has to be read back on an
accelerator (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``,
``repeat_interleave`` without ``output_size``, ``equal``...). A call counted by a wrapper is not
counted again by the dispatch mode.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_METHODS = (
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "tolist",
    "cpu",
    "numpy",
)
_DATA_DEPENDENT = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten.bincount",
    "aten.equal",
    "aten.is_nonzero",
    "aten.allclose",
)


class HostSyncs(TorchDispatchMode):
    """Context manager: ``counts`` maps each syncing call (method or op) to how often it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._inside = 0
        self._saved: dict[str, Callable[..., Any]] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self._inside:
                self.counts[f"Tensor.{name}"] += 1
            self._inside += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._inside -= 1

        return wrapper

    def __enter__(self) -> HostSyncs:
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = str(func)
        if not self._inside:
            packet = name.split(".")[0] + "." + name.split(".")[1] if "." in name else name
            if packet in _DATA_DEPENDENT:
                self.counts[name] += 1
            elif packet == "aten.index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in args[1]
                if i is not None
            ):
                self.counts[name + " (bool mask)"] += 1
            elif packet == "aten.index_put" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in args[1]
                if i is not None
            ):
                self.counts[name + " (bool mask)"] += 1
            elif packet == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None:
                self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _has_mask(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
