"""The deterministic prompt-following checker: what colour, shape and position an image shows.

Per image: the background colour is the per-channel median of the 2-pixel border; the shape is
the largest 4-connected region of pixels farther than `FOREGROUND_DISTANCE` from it; its colour is
the nearest named colour to the median of its inner pixels; its position is the 3x3 grid cell of
its centroid; its shape is a triangle when the region keeps less than 42% of its area in the top
half of its bounding box (1/4 for an ideal triangle, 1/2 for a circle or square), otherwise the
better of a circle and a square template drawn in its bounding box, by intersection over union.
No learning, no randomness.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from training.shapes import COLOUR_NAMES, COLOURS, POSITION_NAMES

BORDER_PX = 2  # width of the frame whose median colour is the background
FOREGROUND_DISTANCE = 48.0  # RGB distance (0-255 units) from the background that counts as shape
MIN_AREA_PX = 12  # a smaller region is noise, not a shape
# below this share of its area in the top half of its box a region is a triangle: the ideal
# shapes have 0.25 (triangle) and 0.5 (circle, square); rounded corners push triangles to ~0.4
TRIANGLE_TOP_SHARE = 0.42

_PALETTE = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)  # (K, 3)


@dataclass(frozen=True)
class Detection:
    """What the checker sees in one image."""

    colour: str
    shape: str
    position: str
    background: str
    area_px: int
    centroid_xy_px: tuple[float, float]
    shape_iou: float  # IoU of the best template


def nearest_colour(rgb: np.ndarray) -> str:
    """The named colour nearest to `rgb` (3,) in RGB."""
    distances = np.linalg.norm(_PALETTE - rgb.astype(np.float32)[None, :], axis=1)
    return COLOUR_NAMES[int(np.argmin(distances))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a (H, W) bool mask, as a bool mask."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if labels[start_y, start_x]:
            continue
        label += 1
        labels[start_y, start_x] = label
        queue, size = deque([(start_y, start_x)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def shape_templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal (height, width) bool masks of each shape filling a bounding box of that size."""
    v = (np.arange(height, dtype=np.float32) + 0.5) / height * 2 - 1  # -1 (top) .. 1 (bottom)
    u = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    u, v = u[None, :], v[:, None]
    depth = (v + 1) / 2  # 0 at the top edge, 1 at the bottom edge
    return {
        "circle": u**2 + v**2 <= 1,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u) <= depth,
    }


def top_share(mask: np.ndarray) -> float:
    """Share of the region's area in the top half of its bounding box (the middle row of an odd
    height counts half): 1/4 for a triangle standing on its base, 1/2 for a circle or a square."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rows = box.sum(axis=1).astype(np.float64)  # (h,) region pixels per row
    half = len(rows) // 2
    top = rows[:half].sum() + (rows[half] / 2 if len(rows) % 2 else 0.0)
    return float(top / rows.sum())


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU with its template) of the region `mask` (H, W) bool.

    A region with less than `TRIANGLE_TOP_SHARE` of its area in its top half is a triangle (this
    moment survives the rounded corners of generated triangles, which template IoU does not);
    otherwise the better of the circle and square templates by intersection over union.
    """
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scores = {}
    for name, template in shape_templates(*box.shape).items():
        union = np.logical_or(box, template).sum()
        scores[name] = float(np.logical_and(box, template).sum() / union)
    if top_share(mask) < TRIANGLE_TOP_SHARE:
        return "triangle", scores["triangle"]
    best = max(("circle", "square"), key=lambda name: scores[name])
    return best, scores[best]


def grid_cell(x_px: float, y_px: float, size_px: int) -> str:
    """Name of the 3x3 grid cell holding the point (x, y) of a size_px x size_px image."""
    column = min(int(x_px * 3 / size_px), 2)
    row = min(int(y_px * 3 / size_px), 2)
    return POSITION_NAMES[row * 3 + column]


def detect(image: np.ndarray) -> Detection | None:
    """Analyse a (H, W, 3) uint8 RGB image; None when no shape stands out from the background."""
    pixels = image.astype(np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate(
        [
            pixels[:BORDER_PX].reshape(-1, 3),
            pixels[-BORDER_PX:].reshape(-1, 3),
            pixels[:, :BORDER_PX].reshape(-1, 3),
            pixels[:, -BORDER_PX:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(border, axis=0)  # (3,)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # (H, W)
    region = largest_component(distance > FOREGROUND_DISTANCE)
    area = int(region.sum())
    if area < MIN_AREA_PX:
        return None
    # colour from the region's inner pixels (all four neighbours inside), away from blended edges
    inner = region.copy()
    inner[1:, :] &= region[:-1, :]
    inner[:-1, :] &= region[1:, :]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    colour_pixels = pixels[inner] if inner.sum() >= 4 else pixels[region]
    ys, xs = np.nonzero(region)
    centroid = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    shape, iou = classify_shape(region)
    return Detection(
        colour=nearest_colour(np.median(colour_pixels, axis=0)),
        shape=shape,
        position=grid_cell(*centroid, size_px=width),
        background=nearest_colour(background_rgb),
        area_px=area,
        centroid_xy_px=centroid,
        shape_iou=iou,
    )
