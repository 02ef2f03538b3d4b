"""The head contract: what any ``nn.Module`` class must offer to be a CAUSE head, and how a head
is built from, and recorded as, a :class:`~cause_lightning.core.specs.HeadSpec`.

Any ``nn.Module`` class can be a head, named by ``_target_`` in
``conf/head/<name>.yaml`` with its arguments. The class takes the backbone width ``dim`` as a
keyword, exposes ``reduced_dim`` (its output width R) and maps ``[B, D, h, w]`` to
``[B, R, h, w]``. What it needs from the pipeline it declares with class attributes
(:class:`HeadTraits`), each ``False`` unless set:

* ``per_token``: each output position depends on its own token only, so stage 2 may feed just the
  grid-sampled tokens (a ``[B, D, N, 1]`` strip) instead of the whole patch grid (the MLP head);
* ``needs_clusterbook``: the constructor takes ``num_concepts`` (K) and ``clusterbook`` (the
  stage-1 ``[K, D]`` rows, or ``None`` when rebuilt from a state dict that holds them);
* ``fixed_grid``: the constructor takes ``num_queries`` (tokens per image at the train resolution)
  and the head runs only on grids of that many tokens, so it trains at the test resolution and
  single images are squashed to a square (the TR head; it exposes ``num_queries``).

A head that declares nothing gets the safe behaviour: the whole patch grid, no clusterbook, any
resolution. :func:`build_head` builds a head from a :class:`~cause_lightning.core.specs.HeadSpec`
(import path + arguments) and records the spec on it, which is what artifacts store and rebuild.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from cause_lightning.core.specs import HeadSpec
from cause_lightning.models.imports import import_class

__all__ = [
    "HeadTraits",
    "build_head",
    "head_arguments",
    "head_class",
    "head_spec",
    "head_traits",
    "remember_arguments",
]


class HeadTraits(NamedTuple):
    """What a head class needs from the pipeline (this module's docstring).

    Attributes:
        per_token: Stage 2 may feed sampled tokens instead of the whole grid.
        needs_clusterbook: The constructor takes ``num_concepts`` and ``clusterbook``.
        fixed_grid: The constructor takes ``num_queries``; the grid size is fixed.
    """

    per_token: bool = False
    needs_clusterbook: bool = False
    fixed_grid: bool = False


def head_traits(head: type | nn.Module) -> HeadTraits:
    """The traits a head class (or instance) declares; ``False`` for everything it does not.

    Args:
        head: A head class or module.

    Returns:
        Its :class:`HeadTraits`.
    """
    cls = head if isinstance(head, type) else type(head)
    return HeadTraits(*(bool(getattr(cls, name, False)) for name in HeadTraits._fields))


def head_class(target: str) -> type[nn.Module]:
    """Import the head class named by ``target`` (``"package.module.Class"``).

    Only ``nn.Module`` classes are accepted: an artifact names its head class, and loading it
    must never call anything else.

    Raises:
        ImportError: When the class cannot be imported (the message says what to put on the path).
        TypeError: When ``target`` names something that is not an ``nn.Module`` class.
    """
    return import_class(target, nn.Module, "head class")


def head_arguments(
    head: type | nn.Module,
    dim: int,
    num_queries: int | None = None,
    num_concepts: int | None = None,
) -> dict[str, Any]:
    """The constructor arguments the pipeline gives a head class, by its traits.

    Args:
        head: The head class (or a module of it).
        dim: Backbone width D (every head).
        num_queries: Tokens per image at the train resolution (``fixed_grid`` heads).
        num_concepts: K, rows of the clusterbook (``needs_clusterbook`` heads).

    Returns:
        ``{"dim": D}`` plus what the traits ask for.

    Raises:
        ValueError: When a trait asks for a value that was not given.
    """
    traits = head_traits(head)
    kwargs: dict[str, Any] = {"dim": int(dim)}
    for wanted, key, value in (
        (traits.fixed_grid, "num_queries", num_queries),
        (traits.needs_clusterbook, "num_concepts", num_concepts),
    ):
        if not wanted:
            continue
        if value is None:
            raise ValueError(f"{getattr(head, '__name__', type(head).__name__)} needs {key}")
        kwargs[key] = int(value)
    return kwargs


def remember_arguments(head: nn.Module, **kwargs: Any) -> None:
    """Record on ``head`` the spec that rebuilds it: its class and these constructor arguments.

    Heads built with :func:`build_head` are recorded by it; a head class that may be constructed
    by hand (as :class:`MLPHead` and :class:`TRHead` are) calls this at the end of its
    constructor with its resolved arguments, so that :func:`head_spec` works for it too.

    Args:
        head: The head being constructed.
        **kwargs: Its constructor arguments as plain values (tensors excluded).
    """
    cls = type(head)
    head.build_spec = HeadSpec(f"{cls.__module__}.{cls.__qualname__}", kwargs)


def build_head(spec: HeadSpec, clusterbook: Tensor | None = None) -> nn.Module:
    """Build the segmentation head a :class:`~cause_lightning.core.specs.HeadSpec` describes.

    Args:
        spec: Head class (import path) and its constructor arguments.
        clusterbook: ``[K, D]`` rows for a ``needs_clusterbook`` head (``None`` when the state
            dict loaded afterwards holds them).

    Returns:
        The head module, with ``build_spec`` set to ``spec``.

    Raises:
        ImportError: When the head class cannot be imported.
        TypeError: When ``spec`` names no head class, or the class does not expose ``reduced_dim``.
        ValueError: On a clusterbook passed to a head that takes none.
    """
    cls = head_class(spec.target)
    extra: dict[str, Any] = {}
    if clusterbook is not None:
        if not head_traits(cls).needs_clusterbook:
            raise ValueError(f"{cls.__name__} takes no clusterbook (needs_clusterbook is not set)")
        extra["clusterbook"] = clusterbook
    head = cls(**spec.kwargs, **extra)
    if not isinstance(getattr(head, "reduced_dim", None), int):
        raise TypeError(
            f"{spec.target} must expose `reduced_dim`, the number of channels its forward returns "
            "(the head contract of cause_lightning.models.contract)"
        )
    head.build_spec = HeadSpec(f"{cls.__module__}.{cls.__qualname__}", spec.kwargs)
    return head


def head_spec(head: nn.Module) -> HeadSpec:
    """The :class:`~cause_lightning.core.specs.HeadSpec` that rebuilds ``head`` (``build_head``).

    Args:
        head: A head built by :func:`build_head`, or by a class that records its arguments
            (:func:`remember_arguments`).

    Returns:
        Its class and constructor arguments.

    Raises:
        TypeError: For a head that recorded neither.
    """
    spec = getattr(head, "build_spec", None)
    if isinstance(spec, HeadSpec):
        return spec
    raise TypeError(
        f"{type(head).__name__} does not record how it was built: build it with "
        "cause_lightning.models.build_head(HeadSpec(target, kwargs)), or call cause_lightning."
        "models.contract.remember_arguments(self, ...) at the end of its constructor"
    )
