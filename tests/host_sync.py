"""Counting the host synchronisations a piece of code would make on an accelerator, on the CPU.

Two instruments, no ``torch.cuda``: the ``Tensor`` methods that hand a value to Python (``item``,
``bool()``, ``int()``, ``float()``, indices, ``tolist``, ``cpu``, ``to("cpu")``, ``numpy``) are
wrapped, and a dispatch mode counts the aten ops whose output shape or value has to be read back
on an accelerator (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``bincount``, ``repeat_interleave`` without ``output_size``, ``equal``...). A call counted by a
wrapper is not counted again by the dispatch mode.

A copy to the host (``cpu()``, ``to("cpu")``) is the read-back; what is computed from host
copies alone stays on the host, so reading it later costs the device nothing and is not counted
(a CPU run cannot tell those tensors apart by their device).
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_METHODS = (
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "tolist",
    "cpu",
    "to",
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


# Tensors copied to the host, and those computed from them alone, by id (whichever counter saw
# them: a value copied during one step may be read in a later one).
_HOST: dict[int, weakref.ref[torch.Tensor]] = {}


def _to_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``Tensor.to`` call names the host: ``"cpu"`` spelled out (a ``torch.device``
    taken from a tensor is the device the code runs on, which a CPU run cannot tell apart)."""
    return any(isinstance(t, str) and t.startswith("cpu") for t in [*args, kwargs.get("device")])


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

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (code that is not under test)."""
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    @staticmethod
    def _on_host(tensor: Any) -> bool:
        ref = _HOST.get(id(tensor))
        return ref is not None and ref() is tensor

    @staticmethod
    def _keep_on_host(result: Any, inputs: Any) -> None:
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and not any(leaf is i for i in tree_leaves(inputs)):
                key = id(leaf)
                _HOST[key] = weakref.ref(leaf, lambda _, key=key: _HOST.pop(key, None))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            copy = name == "cpu" or (name == "to" and _to_host(args, kwargs))
            counted = (name != "to" or copy) and not self._on_host(tensor)
            if counted and not self._inside:
                self.counts[f"Tensor.{name}"] += 1
            self._inside += 1
            try:
                result = original(tensor, *args, **kwargs)
            finally:
                self._inside -= 1
            if copy:
                self._keep_on_host(result, tensor)
            return result

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
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = bool(tensors) and all(self._on_host(t) for t in tensors)
        if not self._inside and not on_host:
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
        result = func(*args, **(kwargs or {}))
        if on_host:
            self._keep_on_host(result, (args, kwargs))
        return result
