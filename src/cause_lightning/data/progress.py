"""Progress bars of the data tools (downloads, unpacking, crop writing)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["make_progress"]


class _RateColumn(ProgressColumn):
    """Throughput in items per second."""

    def __init__(self, unit: str = "images") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            "-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed"
        )


def make_progress(unit: str = "images", enabled: bool = True) -> Progress:
    """A rich progress bar with count, rate (``<unit>/s``), elapsed and remaining time.

    Args:
        unit: name of the counted items.
        enabled: ``False`` returns a disabled (silent) progress object.

    Returns:
        A ``rich.progress.Progress`` (use it as a context manager).
    """
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        redirect_stdout=False,
        redirect_stderr=False,
    )
