"""Grid sampling (method.md §3): one token per non-overlapping ``window x window`` cell of a
feature map, and the draw of its offsets."""

from __future__ import annotations

import torch
from torch import Tensor

from cause_lightning.ops.numerics import check_index

__all__ = ["grid_sample_index", "grid_sample_tokens"]


def grid_sample_index(
    batch: int,
    height: int,
    width: int,
    window: int = 4,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw the grid-sampling offsets of :func:`grid_sample_tokens` for a batch of feature maps.

    One offset per ``window x window`` cell of every image, uniform in ``[0, window**2)`` and
    independent (method §3). Row ``b`` is image ``b``: drawing for a larger batch and keeping some
    rows gives those images the same offsets as the full draw, which is how the stages make the
    sampling of an image independent of the number of processes (docs/scaling.md).

    Args:
        batch: Number of images ``B``.
        height: Feature-grid height ``h``.
        width: Feature-grid width ``w``.
        window: Cell side length.
        generator: Random generator of the draw (the global RNG of ``device`` when ``None``).
        device: Device of the returned index (default: the generator's device, else CPU).

    Returns:
        Long offsets ``[B, (h // window) * (w // window)]``.

    Raises:
        ValueError: On a non-positive window or a grid smaller than one cell.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    cells_h, cells_w = height // window, width // window
    if cells_h == 0 or cells_w == 0:
        raise ValueError(
            f"grid {height}x{width} is smaller than one {window}x{window} cell; use a smaller "
            "window or a larger input resolution."
        )
    target = torch.device(device) if device is not None else None
    if generator is not None:
        draw_device = generator.device
    else:
        draw_device = target if target is not None else torch.device("cpu")
    index = torch.randint(
        0, window * window, (batch, cells_h * cells_w), generator=generator, device=draw_device
    )  # B N
    return index if target is None else index.to(target)


def grid_sample_tokens(
    features: Tensor,
    window: int = 4,
    index: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Keep one token per non-overlapping ``window x window`` cell of a feature map.

    The ``h x w`` grid is cut into ``(h // window) x (w // window)`` cells; leftover rows at the
    bottom and columns at the right are dropped. Cell ``c`` of image ``b`` keeps the token at offset
    ``t = index[b, c]`` inside the cell, addressed row-major (row ``t // window``, column
    ``t % window``). Cells are ordered row-major. Passing the returned ``index`` again samples
    any other map of the same grid (any channel count) at the same positions.

    Args:
        features: Feature map ``[B, C, h, w]``; gradients flow back to the sampled positions.
        window: Cell side length.
        index: Long offsets ``[B, (h // window) * (w // window)]`` in ``[0, window**2)`` to reuse,
            or ``None`` to draw them uniformly and independently for every cell of every image.
        generator: Random generator for the draw when ``index`` is ``None`` (the global RNG of the
            generator's device otherwise; the features' device when no generator is given).
        validate: Check the values of a given ``index`` against ``[0, window**2)`` (reads them
            back from the device; a training step turns it off).

    Returns:
        ``(tokens [B, N, C], index [B, N])`` with ``N = (h // window) * (w // window)``; ``tokens``
        are image-major, cells row-major.

    Raises:
        ValueError: On a non-4-D input, a window larger than the grid, or a malformed ``index``.
    """
    if features.dim() != 4:
        raise ValueError(
            f"features must be a feature map [B, C, h, w], got shape {tuple(features.shape)}."
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    batch, _, height, width = features.shape
    cells_h, cells_w = height // window, width // window
    if cells_h == 0 or cells_w == 0:
        raise ValueError(
            f"grid {height}x{width} is smaller than one {window}x{window} cell; use a smaller "
            "window or a larger input resolution."
        )
    num_cells = cells_h * cells_w
    cell_area = window * window

    if index is None:
        index = grid_sample_index(
            batch, height, width, window, generator=generator, device=features.device
        )
    else:
        if index.shape != (batch, num_cells):
            raise ValueError(
                f"index has shape {tuple(index.shape)} but this map needs [{batch}, {num_cells}] "
                f"(B x cells of a {height}x{width} grid with window {window}); reuse an index only "
                "on maps of the same batch and grid."
            )
        check_index(index, "index")
        index = index.to(device=features.device, dtype=torch.long)
        if validate and index.numel() and (int(index.min()) < 0 or int(index.max()) >= cell_area):
            raise ValueError(
                f"index values must lie in [0, {cell_area}) for window {window}; was the index "
                "drawn with another window?"
            )

    # Flat spatial position of the kept token of every cell.
    cell = torch.arange(num_cells, device=features.device)
    rows = (cell // cells_w) * window + index // window  # B N
    cols = (cell % cells_w) * window + index % window  # B N
    flat = rows * width + cols  # B N
    batch_ids = torch.arange(batch, device=features.device)[:, None]  # B 1
    # Advanced indexing on the [B, h*w, C] view gathers [B, N, C] without copying the whole map.
    tokens = features.flatten(2).transpose(1, 2)[batch_ids, flat]  # B N C
    return tokens, index
