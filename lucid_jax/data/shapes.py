"""Synthetic shapes: the built-in dataset behind the demo and the tests.

Each image holds a few filled rectangles, ellipses and triangles in saturated colours
on a dark grey, lightly noisy background. The class is the shape, never the colour,
so a detector has to look at outlines. Item ``i`` is a pure function of
``(seed, i)``: the same index always gives the same pixels and boxes, in any order
and from any thread.

Shapes are rasterised by testing pixel centres, pixel ``(r, c)`` being the unit
square ``[c, c + 1) x [r, r + 1)``, and each box is then measured on the drawn mask:
``(min col, min row, max col + 1, max row + 1)``. Boxes are therefore exact, tight
and in the project's continuous xyxy convention, whatever the rasteriser rounds.
The box of a partly covered shape still bounds the whole shape, as a human annotator
would draw it; ``max_overlap`` keeps such occlusion small.
"""

import dataclasses

import numpy as np

from lucid_jax.data.boxes import iou_one_to_many
from lucid_jax.data.dataset import Annotation, Example, make_annotation, make_example

CLASS_NAMES = ("rectangle", "ellipse", "triangle")
RECTANGLE, ELLIPSE, TRIANGLE = 1, 2, 3

# Bright colours, all far from the background greys below.
_PALETTE = np.array(
    [
        (230, 40, 40),
        (40, 200, 60),
        (60, 90, 240),
        (240, 220, 40),
        (220, 60, 220),
        (40, 220, 220),
        (250, 140, 30),
        (245, 245, 245),
    ],
    np.uint8,
)
_BACKGROUND_GREY = (20, 90)  # uniform range of the background level
_PLACEMENT_TRIES = 20


def rasterize(kind: int, rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float):
    """Fill one shape inscribed in the continuous frame ``[x0, x1] x [y0, y1]``.

    Args:
      kind: RECTANGLE, ELLIPSE or TRIANGLE.
      rng: draws the triangle's apex (position along one side, and which side).
      x0, y0, x1, y1: the frame, inside the image.

    Returns:
      (mask, row0, col0): mask [h, w] bool over the pixel window whose top-left pixel
      is (row0, col0); True where the pixel centre lies in the shape.
    """
    col0, row0 = int(np.floor(x0)), int(np.floor(y0))
    xs = np.arange(col0, int(np.ceil(x1)), dtype=np.float64) + 0.5  # [w] pixel centres
    ys = (np.arange(row0, int(np.ceil(y1)), dtype=np.float64) + 0.5)[:, None]  # [h, 1]
    if kind == RECTANGLE:
        mask = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    elif kind == ELLIPSE:
        cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        mask = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0
    elif kind == TRIANGLE:
        t = rng.uniform(0.0, 1.0)
        side = int(rng.integers(4))  # the frame side that holds the apex
        apex = [(x0 + t * (x1 - x0), y0), (x0 + t * (x1 - x0), y1), (x0, y0 + t * (y1 - y0)), (x1, y0 + t * (y1 - y0))][
            side
        ]
        base = [((x0, y1), (x1, y1)), ((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x0, y0), (x0, y1))][side]
        verts = [apex, *base]
        # Edge functions: a point is inside when it is on the same side of all three edges.
        signs = []
        for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
            signs.append((bx - ax) * (ys - ay) - (by - ay) * (xs - ax))
        mask = np.all([s >= 0 for s in signs], axis=0) | np.all([s <= 0 for s in signs], axis=0)
    else:
        raise ValueError(f"unknown shape kind {kind}; expected one of {RECTANGLE, ELLIPSE, TRIANGLE}")
    return np.broadcast_to(mask, (len(ys), len(xs))), row0, col0


@dataclasses.dataclass(frozen=True)
class ShapesDataset:
    """Deterministic synthetic detection data (follows :class:`lucid_jax.data.Dataset`).

    Attributes:
      num_examples: ``len(dataset)``.
      image_size: int (square) or (height, width).
      min_objects, max_objects: objects per image, drawn uniformly; fewer when no
        free place is found in a few tries (the first object always fits).
      min_object_size, max_object_size: range of each frame side in pixels.
      max_overlap: largest IoU allowed between two objects' boxes.
      noise: standard deviation of the background's Gaussian noise (0: plain).
      seed: dataset seed; item i depends on (seed, i) only.
    """

    num_examples: int = 1000
    image_size: int | tuple[int, int] = 128
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: float = 16.0
    max_object_size: float = 48.0
    max_overlap: float = 0.1
    noise: float = 6.0
    seed: int = 0
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):
        h, w = self.size
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 2.0 <= self.min_object_size <= self.max_object_size <= min(h, w):
            raise ValueError(
                f"need 2 <= min_object_size <= max_object_size <= min(image_size), got "
                f"{self.min_object_size}, {self.max_object_size} for image size {(h, w)}"
            )
        if self.num_examples < 0 or self.noise < 0:
            raise ValueError(f"num_examples and noise must be >= 0, got {self.num_examples}, {self.noise}")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        s = self.image_size
        return (int(s), int(s)) if isinstance(s, int | np.integer) else (int(s[0]), int(s[1]))

    def __len__(self) -> int:
        return self.num_examples

    def _layout(self, index: int):
        """Background [H, W, 3] uint8 and a list of (label, colour, mask, row0, col0, box)."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.num_examples}")
        rng = np.random.default_rng([self.seed, index])
        h, w = self.size
        grey = rng.uniform(*_BACKGROUND_GREY)
        background = np.full((h, w, 3), grey, np.float32)
        if self.noise > 0:
            background += rng.normal(0.0, self.noise, (h, w, 3)).astype(np.float32)
        background = np.clip(np.rint(background), 0, 255).astype(np.uint8)

        objects, boxes = [], np.zeros((0, 4))
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            for _ in range(_PLACEMENT_TRIES):
                fw, fh = rng.uniform(self.min_object_size, self.max_object_size, 2)
                x0, y0 = rng.uniform(0.0, w - fw), rng.uniform(0.0, h - fh)
                label = int(rng.integers(1, len(CLASS_NAMES) + 1))
                mask, row0, col0 = rasterize(label, rng, x0, y0, x0 + fw, y0 + fh)
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                if not len(rows):
                    continue
                box = np.array([col0 + cols[0], row0 + rows[0], col0 + cols[-1] + 1, row0 + rows[-1] + 1], np.float64)
                if len(boxes) and iou_one_to_many(box, boxes).max() > self.max_overlap:
                    continue
                colour = _PALETTE[int(rng.integers(len(_PALETTE)))]
                objects.append((label, colour, mask, row0, col0, box))
                boxes = np.concatenate([boxes, box[None]])
                break
        return background, objects

    def __getitem__(self, index: int) -> Example:
        """Item ``index``: image [H, W, 3] uint8, boxes [M, 4], labels [M] in 1..3; id is the index."""
        index = int(index)
        image, objects = self._layout(index)
        for _, colour, mask, r, c, _ in objects:
            image[r : r + mask.shape[0], c : c + mask.shape[1]][mask] = colour
        return make_example(
            image,
            [o[5] for o in objects],
            [o[0] for o in objects],
            id=index,
        )

    def annotation(self, index: int) -> Annotation:
        """The boxes and labels of item ``index`` without painting it; nothing is ignored."""
        index = int(index)
        _, objects = self._layout(index)
        h, w = self.size
        labels = [o[0] for o in objects]
        return make_annotation([o[5] for o in objects], labels, np.zeros(len(labels), bool), index, h, w)

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) of item ``index``: every item has :attr:`size`."""
        return self.size

    def train_object_counts(self) -> np.ndarray:
        """[N] objects per item (each layout is drawn, the shapes are not painted)."""
        return np.asarray([len(self._layout(i)[1]) for i in range(self.num_examples)], np.int64)

    def masks(self, index: int) -> np.ndarray:
        """Each object's full silhouette, occluded parts included.

        Returns:
          [M, H, W] bool, in the order of ``self[index]["boxes"]``.
        """
        _, objects = self._layout(int(index))
        out = np.zeros((len(objects), *self.size), bool)
        for k, (_, _, mask, r, c, _) in enumerate(objects):
            out[k, r : r + mask.shape[0], c : c + mask.shape[1]] = mask
        return out
