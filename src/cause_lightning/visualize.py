"""Visualisation helpers for segmentation outputs (docs/architecture.md, ``stage=predict`` outputs).

Colour maps for cluster / class ids, image overlays, thumbnails, side-by-side contact sheets
(image | prediction | ground truth per row), a small HTML index of the written PNGs, and an
atomic PNG writer. Everything works on numpy arrays (``uint8 [H, W, 3]`` images, integer
``[H, W]`` label maps with ``ignore_index`` = 255) and PIL. The per-pixel functions work in bands
of rows, so their temporaries stay a few megabytes whatever the image size: a photo of 36
megapixels costs its output and little more.
"""

from __future__ import annotations

import colorsys
import html
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cause_lightning.core.constants import IGNORE_INDEX
from cause_lightning.core.files import atomic_write
from cause_lightning.core.logs import get_logger

__all__ = [
    "TITLE_HEIGHT",
    "colorize",
    "contact_sheet",
    "contact_sheet_html",
    "default_palette",
    "voc_palette",
    "overlay",
    "save_png",
    "thumbnail",
    "to_rgb_uint8",
]

log = get_logger(__name__)

#: Height in pixels of the text strip drawn above each contact-sheet row that has a title.
TITLE_HEIGHT = 14

# Pixels per band of rows in the per-pixel functions (float and index temporaries of ~10 MB).
_BAND_PIXELS = 1 << 20

_GOLDEN = 0.618033988749895
# Saturation / value levels cycled through so that hues that come round again stay apart.
_SAT_LEVELS = (0.85, 0.55, 1.0, 0.7)
_VAL_LEVELS = (0.95, 0.7, 0.82, 0.55)


def voc_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved) for ``n`` classes.

    Class ``i`` spreads its bits over the three channels, high bits first, so ids below 2**24 all
    get different colours; id 0 is black.

    Args:
        n: Number of classes.

    Returns:
        ``uint8`` array ``[n,3]``.
    """
    if n < 0:
        raise ValueError(f"Palette size must be non-negative, got {n}.")
    ids = np.arange(n, dtype=np.int64)
    palette = np.zeros((n, 3), dtype=np.int64)
    c = ids.copy()
    for shift in range(7, -1, -1):
        for ch in range(3):
            palette[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return palette.astype(np.uint8)


def default_palette(n: int) -> np.ndarray:
    """Deterministic palette of ``n`` distinct, non-black colours.

    Hues advance by the golden ratio (so neighbouring ids get far-apart hues) while saturation
    and value cycle through a few levels. Pure black is never produced: it is reserved for
    ignored pixels in :func:`colorize`. Colours are unique for any ``n`` up to 2**24 - 1.

    Args:
        n: number of colours (>= 0).

    Returns:
        ``np.uint8`` array ``[n, 3]`` (RGB).

    Raises:
        ValueError: if ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"default_palette: n must be >= 0, got {n}")
    out = np.zeros((n, 3), dtype=np.uint8)
    seen: set[tuple[int, int, int]] = {(0, 0, 0)}
    for i in range(n):
        hue = (i * _GOLDEN) % 1.0
        sat = _SAT_LEVELS[(i // 7) % len(_SAT_LEVELS)]
        val = _VAL_LEVELS[(i // 3) % len(_VAL_LEVELS)]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        rgb = (round(r * 255), round(g * 255), round(b * 255))
        # Rounding to uint8 can collide for large n; walk deterministically to a free colour.
        # 40503 is odd, hence coprime with 2**24: the walk visits every colour before repeating.
        base = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
        step = 0
        while rgb in seen:
            step += 1
            code = (base + step * 40503) % (1 << 24)
            rgb = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
        seen.add(rgb)
        out[i] = rgb
    return out


def colorize(
    labels: np.ndarray, palette: np.ndarray | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Map an integer label map to RGB colours.

    Args:
        labels: integer array ``[H, W]`` (cluster or class ids). ``ignore_index`` and negative
            values (e.g. unmatched clusters marked -1) are drawn black.
        palette: ``uint8 [n, 3]`` colours indexed by id; ``None`` uses
            ``default_palette(max_id + 1)``.
        ignore_index: id drawn black.

    Returns:
        ``np.uint8`` array ``[H, W, 3]``.

    Raises:
        ValueError: if ``labels`` is not 2-D / integer, or holds an id the palette does not cover.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"colorize expects a [H, W] label map, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"colorize expects integer labels, got dtype {labels.dtype}")
    top = -1  # the largest drawn id
    for rows in _bands(*labels.shape):
        band = labels[rows].astype(np.int64)
        band = band[(band != ignore_index) & (band >= 0)]
        if band.size:
            top = max(top, int(band.max()))
    if palette is None:
        palette = default_palette(top + 1)
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must have shape [n, 3], got {palette.shape}")
    if top >= len(palette):
        raise ValueError(
            f"label id {top} is outside the palette of {len(palette)} colours; pass a larger "
            f"palette, e.g. default_palette({top + 1})"
        )
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    for rows in _bands(*labels.shape):
        band = labels[rows].astype(np.int64)
        valid = (band != ignore_index) & (band >= 0)
        out[rows][valid] = palette[band[valid]]
    return out


def _bands(height: int, width: int) -> Iterator[slice]:
    """Slices of rows covering ``height`` rows of ``width`` pixels, about ``_BAND_PIXELS`` each."""
    step = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, step):
        yield slice(top, min(top + step, height))


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Bring an image-like array to ``uint8 [H, W, 3]``.

    Accepts ``[H, W]`` (grayscale), ``[H, W, 1]``, ``[H, W, 3]`` and ``[H, W, 4]`` (alpha dropped),
    as ``uint8``, ``bool`` or float in ``[0, 1]``.

    Args:
        array: the image.

    Returns:
        ``np.uint8`` array ``[H, W, 3]``.

    Raises:
        ValueError: on an unsupported shape or dtype.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(
                f"integer image values must lie in [0, 255], got [{a.min()}, {a.max()}]; "
                "colorize label maps first"
            )
        a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"expected an image [H, W], [H, W, 1|3|4], got shape {a.shape}")
    return np.ascontiguousarray(a)


def overlay(
    image: np.ndarray,
    colour: np.ndarray,
    alpha: float = 0.5,
    ignore_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Alpha-blend a colour map onto an image: ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: ``uint8 [H, W, 3]`` (grayscale / RGBA accepted, see :func:`to_rgb_uint8`).
        colour: ``uint8 [H, W, 3]`` colour map of the same size (e.g. from :func:`colorize`).
        alpha: weight of the colour map, in ``[0, 1]``.
        ignore_mask: optional bool ``[H, W]``; where True the original image is kept.

    Returns:
        ``np.uint8`` array ``[H, W, 3]``.

    Raises:
        ValueError: on mismatched sizes or ``alpha`` outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    img = to_rgb_uint8(image)
    col = to_rgb_uint8(colour)
    if img.shape != col.shape:
        raise ValueError(
            f"overlay: image {img.shape[:2]} and colour map {col.shape[:2]} differ in size; "
            "resize the prediction to the image first"
        )
    mask = None if ignore_mask is None else np.asarray(ignore_mask, dtype=bool)
    if mask is not None and mask.shape != img.shape[:2]:
        raise ValueError(f"overlay: ignore_mask {mask.shape} != image {img.shape[:2]}")
    out = np.empty_like(img)
    for rows in _bands(*img.shape[:2]):
        mixed = (1.0 - alpha) * img[rows].astype(np.float32) + alpha * col[rows].astype(np.float32)
        out[rows] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        if mask is not None:
            out[rows][mask[rows]] = img[rows][mask[rows]]
    return out


def thumbnail(array: np.ndarray, side: int, nearest: bool = False) -> np.ndarray:
    """A copy of an image shrunk (aspect kept) so that its longer side is at most ``side``.

    Args:
        array: Image (see :func:`to_rgb_uint8`).
        side: Longest side of the result in pixels (>= 1); smaller images are copied unchanged.
        nearest: Sample the nearest pixel (colour masks keep their exact colours) instead of
            filtering (photographs).

    Returns:
        ``np.uint8`` array ``[h, w, 3]`` with ``max(h, w) <= side``.
    """
    if side < 1:
        raise ValueError(f"thumbnail: side must be >= 1, got {side}")
    picture = Image.fromarray(to_rgb_uint8(array))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    picture.thumbnail((side, side), resample)
    return np.asarray(picture, dtype=np.uint8).copy()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str] | None = None,
    pad: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Tile images into a grid, one row per sample (e.g. image | prediction | ground truth).

    Column ``j`` is as wide as its widest cell and row ``i`` as tall as its tallest cell; cells
    are placed top-left in their slot with ``pad`` pixels between and around them. A row with a
    non-empty title gets a strip of :data:`TITLE_HEIGHT` pixels above it holding the text.
    The sheet is therefore ``pad + sum(col_w + pad)`` wide and
    ``pad + sum(title_h + row_h + pad)`` tall.

    Args:
        rows: list of rows, each a list of image arrays (see :func:`to_rgb_uint8`). Rows may
            have different lengths.
        titles: optional per-row titles (same length as ``rows``).
        pad: spacing in pixels.
        background: RGB fill colour.

    Returns:
        ``np.uint8`` array ``[H_sheet, W_sheet, 3]``.

    Raises:
        ValueError: if ``rows`` is empty, a row is empty, ``pad < 0`` or ``titles`` has the
            wrong length.
    """
    if not rows:
        raise ValueError("contact_sheet: no rows given")
    if pad < 0:
        raise ValueError(f"contact_sheet: pad must be >= 0, got {pad}")
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"contact_sheet: {len(titles)} titles for {len(rows)} rows")
    cells = [[to_rgb_uint8(c) for c in row] for row in rows]
    if any(len(row) == 0 for row in cells):
        raise ValueError("contact_sheet: every row needs at least one image")
    ncols = max(len(row) for row in cells)
    col_w = [max(row[j].shape[1] for row in cells if j < len(row)) for j in range(ncols)]
    row_h = [max(c.shape[0] for c in row) for row in cells]
    title_h = [TITLE_HEIGHT if titles is not None and titles[i] else 0 for i in range(len(cells))]
    width = pad + sum(w + pad for w in col_w)
    height = pad + sum(t + h + pad for t, h in zip(title_h, row_h, strict=True))
    sheet = np.empty((height, width, 3), dtype=np.uint8)
    sheet[:] = np.asarray(background, dtype=np.uint8)
    y = pad
    for i, row in enumerate(cells):
        y_img = y + title_h[i]
        x = pad
        for j, cell in enumerate(row):
            h, w = cell.shape[:2]
            sheet[y_img : y_img + h, x : x + w] = cell
            x += col_w[j] + pad
        y = y_img + row_h[i] + pad
    if titles is not None and any(titles):
        canvas = Image.fromarray(sheet)
        draw = ImageDraw.Draw(canvas)
        font = _font()
        y = pad
        for i, title in enumerate(titles):
            if title:
                draw.text((pad, y + 1), str(title), fill=(0, 0, 0), font=font)
            y += title_h[i] + row_h[i] + pad
        sheet = np.asarray(canvas, dtype=np.uint8).copy()
    return sheet


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an array as PNG atomically (temporary file in the same folder, then rename).

    ``uint8`` ``[H, W]`` / ``[H, W, 3]`` / ``[H, W, 4]`` are written as L / RGB / RGBA; bool as L
    (0/255); other integer ``[H, W]`` maps (e.g. cluster ids) as L when they fit in ``[0, 255]``,
    else as 16-bit grayscale.

    Args:
        array: the image or label map.
        path: destination (parent folders are created).

    Returns:
        The written path.

    Raises:
        ValueError: on an unsupported shape / dtype or values outside ``[0, 65535]``.
    """
    a = np.asarray(array)
    path = Path(path)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        raise ValueError("save_png: float arrays are ambiguous; convert to uint8 first")
    if a.ndim == 3 and a.shape[2] in (3, 4) and a.dtype == np.uint8:
        img = Image.fromarray(np.ascontiguousarray(a))  # RGB or RGBA
    elif a.ndim == 2 and np.issubdtype(a.dtype, np.integer):
        lo = int(a.min()) if a.size else 0
        hi = int(a.max()) if a.size else 0
        if lo < 0 or hi > 65535:
            raise ValueError(f"save_png: values must lie in [0, 65535], got [{lo}, {hi}]")
        if hi <= 255:
            img = Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))  # L
        else:
            img = Image.fromarray(np.ascontiguousarray(a.astype(np.uint16)))  # I;16
    else:
        raise ValueError(
            f"save_png: unsupported array shape {a.shape} / dtype {a.dtype}; expected uint8 "
            "[H, W, 3|4] or an integer [H, W] map"
        )
    # Encoded straight into the file: no second copy of the picture in memory.
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def contact_sheet_html(
    entries: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "cause_lightning predictions",
    captions: Sequence[str] | None = ("image", "prediction", "ground truth"),
) -> Path:
    """Write a self-contained HTML page (no external CSS / JS) showing written PNGs in a table.

    Args:
        entries: one mapping per row with ``"images"`` (list of PNG paths, absolute or relative
            to the current directory) and an optional ``"title"``.
        path: the HTML file to write; image references are made relative to its folder, so the
            page keeps working when the folder is moved as a whole.
        title: page title.
        captions: optional column headers (``None`` for none).

    Returns:
        The written path.

    Raises:
        ValueError: if an entry has no ``"images"`` list.
    """
    path = Path(path)
    base = path.parent.resolve()
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{padding:4px;vertical-align:top;text-align:left}img{max-width:480px;"
        "image-rendering:pixelated}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>",
    ]
    if captions:
        heads = "".join(f"<th>{html.escape(str(c))}</th>" for c in captions)
        lines.append(f"<tr><th></th>{heads}</tr>")
    for k, entry in enumerate(entries):
        images = entry.get("images")
        if not isinstance(images, Sequence) or isinstance(images, str):
            raise ValueError(f"contact_sheet_html: entry {k} needs an 'images' list of PNG paths")
        name = html.escape(str(entry.get("title", "")))
        cells = []
        for img_path in images:
            rel = Path(os.path.relpath(Path(img_path).resolve(), base)).as_posix()
            src = html.escape(rel, quote=True)
            cells.append(f'<td><a href="{src}"><img src="{src}" alt="{src}"></a></td>')
        lines.append(f"<tr><th>{name}</th>{''.join(cells)}</tr>")
    lines += ["</table>", "</body></html>", ""]
    text = "\n".join(lines)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
