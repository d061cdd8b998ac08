"""The procedural captioned dataset: one coloured shape at a named position on a plain background.

A scene is a shape (circle, square, triangle) of a named colour, centred near one of the nine
cells of a 3x3 grid ("top left", "top", ..., "bottom right"), on a background of another named
colour. Images are 64x64 RGB, rendered with numpy at 4x supersampling (anti-aliased edges); their
captions come from `training.captions`. Everything is a pure function of a seed.

Held-out combinations: the 24 (colour, shape, position) triples of `HELD_OUT` never appear in
training; they are what the evaluation measures. For colour i (in `COLOURS` order) and shape j
(in `SHAPES` order) the held-out position is `POSITIONS[(i + 3 * j) % 9]`. So every (colour, shape)
pair keeps 8 of its 9 positions in training, every (colour, position) pair at least 2 of its 3
shapes and every (shape, position) pair at least 7 of its 8 colours: the model has seen every
word and every pair of words, never these triples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # pixels per side
SUPERSAMPLE = 4  # render at 4x, then average 4x4 blocks: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 165, 50),
    "blue": (30, 70, 225),
    "purple": (140, 45, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# name -> (row, column) in the 3x3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}

CELL_CENTRES_PX = (12.0, 32.0, 52.0)  # centre of grid row/column 0, 1, 2 (the thirds' edges: 21.3, 42.7)
JITTER_PX = 1.5  # shape centres move uniformly within +-JITTER_PX of their cell centre
SIZE_RANGE_PX = (16.0, 20.0)  # side of the shape's bounding box, uniform

COLOUR_NAMES = tuple(COLOURS)
POSITION_NAMES = tuple(POSITIONS)

HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (colour, shape, POSITION_NAMES[(i + 3 * j) % len(POSITION_NAMES)])
    for i, colour in enumerate(COLOUR_NAMES)
    for j, shape in enumerate(SHAPES)
)


@dataclass(frozen=True)
class Scene:
    """What one image shows, and exactly where (pixel units of the 64x64 image)."""

    colour: str
    shape: str
    position: str
    background: str
    centre_x_px: float
    centre_y_px: float
    size_px: float

    @property
    def combination(self) -> tuple[str, str, str]:
        """(colour, shape, position): the triple the held-out split is defined on."""
        return (self.colour, self.shape, self.position)


def scene_at(colour: str, shape: str, position: str, background: str, rng: np.random.Generator) -> Scene:
    """A scene with the given words and a random (jittered) centre and size."""
    if colour == background:
        raise ValueError(f"the shape colour and the background are both {colour!r}")
    row, column = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
    return Scene(
        colour=colour,
        shape=shape,
        position=position,
        background=background,
        centre_x_px=CELL_CENTRES_PX[column] + float(dx),
        centre_y_px=CELL_CENTRES_PX[row] + float(dy),
        size_px=float(rng.uniform(*SIZE_RANGE_PX)),
    )


def random_scene(rng: np.random.Generator, held_out: bool = False) -> Scene:
    """A uniformly random training scene (never a held-out triple), or, with `held_out`, a scene
    of a uniformly random held-out triple. The background is any colour but the shape's."""
    if held_out:
        triples = sorted(HELD_OUT)
        colour, shape, position = triples[rng.integers(len(triples))]
    else:
        while True:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            position = POSITION_NAMES[rng.integers(len(POSITION_NAMES))]
            if (colour, shape, position) not in HELD_OUT:
                break
    others = [c for c in COLOUR_NAMES if c != colour]
    background = others[rng.integers(len(others))]
    return scene_at(colour, shape, position, background, rng)


def shape_mask(scene: Scene, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the shape covers: (size, size) float32 in [0, 1]."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample  # sub-pixel centres, pixel units
    x = coords[None, :] - scene.centre_x_px  # (1, n)
    y = coords[:, None] - scene.centre_y_px  # (n, 1)
    half = scene.size_px / 2
    if scene.shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif scene.shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif scene.shape == "triangle":
        # apex at the top centre, base along the bottom edge of the bounding box
        depth = (y + half) / scene.size_px  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(x) <= depth * half)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {SHAPES}")
    coverage = inside.astype(np.float32).reshape(size, supersample, size, supersample)
    return coverage.mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 RGB image."""
    alpha = shape_mask(scene, size)[..., None]  # (H, W, 1)
    foreground = np.array(COLOURS[scene.colour], dtype=np.float32)
    background = np.array(COLOURS[scene.background], dtype=np.float32)
    image = alpha * foreground + (1 - alpha) * background  # (H, W, 3)
    return np.round(image).astype(np.uint8)


def make_dataset(count: int, seed: int, held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """`count` random scenes and their images (count, 64, 64, 3) uint8, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, held_out) for _ in range(count)]
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3))
    return images.astype(np.uint8), scenes
