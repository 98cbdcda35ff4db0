"""Sample grids as images: tiles of uint8 images, optionally magnified and labelled.

Used by the sampling job (rows = classes, column groups = w), sweeps (rows = w) and
serving. Only the presentation lives here; the samples themselves are saved raw by
their jobs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_PAD = 6  # pixels around a label
FONT_SIZE = 14  # of PIL's default font, when it can be sized (FreeType)


def make_grid(images: np.ndarray, rows: int, cols: int, pad: int = 2, gap: int = 6, per_cell: int = 1) -> Image.Image:
    """Tile uint8 (rows·cols·per_cell, H, W, C) images, ordered row-major with each cell's
    ``per_cell`` images side by side; cells separated by ``gap`` pixels."""
    _, H, W, C = images.shape
    cell_w = per_cell * (W + pad) - pad
    canvas = np.full((rows * (H + gap) - gap, cols * (cell_w + gap) - gap, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        cell, k = divmod(i, per_cell)
        r, c = divmod(cell, cols)
        y, x = r * (H + gap), c * (cell_w + gap) + k * (W + pad)
        canvas[y:y + H, x:x + W] = img
    return Image.fromarray(canvas[..., 0] if C == 1 else canvas)


def zoom_for(size: int, min_px: int = 84) -> int:
    """The integer magnification that makes a ``size``-pixel image at least ``min_px`` wide."""
    return max(1, math.ceil(min_px / size))


def _font(size: int | None) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(images: np.ndarray, row_labels: Sequence[str], cols: int, col_labels: Sequence[str] = (),
                  per_cell: int = 1, zoom: int = 1, left: int | None = None,
                  font_size: int | None = FONT_SIZE) -> Image.Image:
    """make_grid of uint8 (rows·cols·per_cell, H, W, C) images, magnified ``zoom``× (nearest
    neighbour), as RGB with a white margin: ``row_labels`` left of each row (vertically
    centred), ``col_labels`` (if any) above each column of cells (centred).

    The grid fills the bottom-right of the image; the left margin is ``left`` pixels, or
    as wide as the longest row label; the top margin is one line of text, or none.
    """
    if len(row_labels) * cols * per_cell != len(images):
        raise ValueError(f"{len(images)} images do not fill {len(row_labels)} rows x {cols} columns "
                         f"x {per_cell} per cell")
    if col_labels and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    _, H, W, _ = images.shape
    gap, pad = 6, 2  # make_grid's defaults, magnified with the images
    grid = make_grid(images, rows=len(row_labels), cols=cols, pad=pad, gap=gap, per_cell=per_cell).convert("RGB")
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    font = _font(font_size)
    draw = ImageDraw.Draw(grid)  # only to measure text
    boxes = {t: draw.textbbox((0, 0), t, font=font) for t in [*row_labels, *col_labels]}
    if left is None:
        left = max(b[2] for b in boxes.values()) + 2 * LABEL_PAD if row_labels else 0
    top = max(boxes[t][3] for t in col_labels) + 2 * LABEL_PAD if col_labels else 0
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    row_h, cell_w = (H + gap) * zoom, (per_cell * (W + pad) - pad + gap) * zoom
    for r, text in enumerate(row_labels):
        b = boxes[text]
        y = top + r * row_h + (H * zoom - (b[3] - b[1])) // 2 - b[1]
        draw.text((min(LABEL_PAD, max(0, left - b[2])), y), text, fill="black", font=font)
    for c, text in enumerate(col_labels):
        b = boxes[text]
        x = left + c * cell_w + ((cell_w - gap * zoom) - (b[2] - b[0])) // 2 - b[0]
        draw.text((x, LABEL_PAD), text, fill="black", font=font)
    return canvas
