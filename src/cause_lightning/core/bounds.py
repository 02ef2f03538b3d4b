"""The values a setting accepts, declared next to the setting itself.

A stage module declares a hyper-parameter's type and range in its signature,
``temperature: Annotated[float, POSITIVE]``; the configuration's own settings do the same in
:mod:`cause_lightning.config.schema`. :func:`cause_lightning.config.validate` reads both before any
work starts, so a range is written once, beside the key it belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cause_lightning.core.errors import SettingsError

__all__ = [
    "Bound",
    "COUNT",
    "FRACTION",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "OPTIONAL_COUNT",
    "OPTIONAL_NON_NEGATIVE_INT",
    "OPTIONAL_POSITIVE",
    "OPTIONAL_RESOLUTION",
    "POSITIVE",
    "PROBABILITY",
    "RESOLUTION",
    "SEED",
    "SIMILARITY",
    "check_overcluster",
]


@dataclass(frozen=True)
class Bound:
    """An interval of accepted values, whole numbers only, or also null.

    Args:
        low: Smallest accepted value (``None``: unbounded).
        high: Largest accepted value (``None``: unbounded).
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        integer: Whole numbers only.
        optional: Accept ``None`` (null) too.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        """What the bound accepts, in words (``"an integer in [1, 65536]"``)."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind[2:] if self.integer else 'number'}"
        return text + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` lies in the bound (booleans and non-numbers never do)."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and float(value) != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value >= self.high if self.high_open else value <= self.high)


COUNT = Bound(low=1, integer=True)
OPTIONAL_COUNT = Bound(low=1, integer=True, optional=True)
NON_NEGATIVE_INT = Bound(low=0, integer=True)
OPTIONAL_NON_NEGATIVE_INT = Bound(low=0, integer=True, optional=True)
POSITIVE = Bound(low=0, low_open=True)
OPTIONAL_POSITIVE = Bound(low=0, low_open=True, optional=True)
NON_NEGATIVE = Bound(low=0)
FRACTION = Bound(low=0, high=1)
#: A dropout probability: 1 would drop everything.
PROBABILITY = Bound(low=0, high=1, high_open=True)
SIMILARITY = Bound(low=-1, high=1)
SEED = Bound(low=0, high=2**32 - 1, integer=True)
#: Input sides in pixels: beyond 8192 a ViT's token grid no longer fits any machine's memory.
RESOLUTION = Bound(low=1, high=8192, integer=True)
OPTIONAL_RESOLUTION = Bound(low=1, high=8192, integer=True, optional=True)


def check_overcluster(counts: Any, num_classes: int) -> list[int]:
    """Validate ``method.eval.overcluster``: distinct cluster counts, each above the class count.

    Args:
        counts: The configured list (empty = over-clustering off).
        num_classes: ``data.num_classes``.

    Returns:
        The counts as a sorted list of ints.

    Raises:
        SettingsError: When a count is not an integer greater than ``num_classes`` or repeats.
    """
    values = list(counts or [])
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or k <= num_classes]
    if bad:
        raise SettingsError(
            f"method.eval.overcluster={values}: every entry must be an integer cluster count "
            f"greater than data.num_classes={num_classes} (over-clustering scores k > C clusters "
            f"with many-to-one matching); offending: {bad}. Use e.g. "
            f"method.eval.overcluster=[{2 * num_classes},{4 * num_classes}], or [] to turn it off."
        )
    if len(set(values)) != len(values):
        raise SettingsError(f"method.eval.overcluster={values} repeats a cluster count")
    return sorted(values)
