"""Aspect-ratio canvases: a few fixed padded shapes instead of one square, each compiled once.

``--image-size S`` keeps one S x S canvas: every image is resized so that its longer
side is S. ``--image-size SHORT:LONG`` resizes as torchvision and detectron2 do (the
shorter side to SHORT, the longer at most LONG) and pads onto one of three canvases,
chosen by the image's orientation:

    landscape  (w / h > band)    SHORT x LONG   (rounded up to the size multiple)
    portrait   (h / w > band)    LONG x SHORT
    square     (otherwise)       M x M, M = min(LONG, SHORT * band) rounded up

With 800:1333 and the default band 1.25 these are 800 x 1344, 1344 x 800 and 1024 x
1024, where one square canvas would be 1344 x 1344. The canvas of an image is a pure
function of its size (after EXIF rotation), and a batch holds images of one canvas
only, so a run compiles at most ``len(canvases)`` shapes per batch size.
"""

import math
from dataclasses import dataclass

import numpy as np

SQUARE_BAND = 1.25  # aspect ratios up to 5:4 either way go on the square canvas
ORIENTATIONS = ("landscape", "portrait", "square")


def _round_up(n: float, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


@dataclass(frozen=True)
class Canvases:
    """The resize rule and the canvases of one ``--image-size``.

    Attributes:
      short, long: SHORT and LONG; equal for a square ``S``.
      multiple: canvas sides are multiples of this (the backbone's size divisibility).
      band: the largest aspect ratio that goes on the square canvas.
    """

    short: int
    long: int
    multiple: int = 32
    band: float = SQUARE_BAND

    def __post_init__(self):
        if self.short < 1 or self.long < self.short:
            raise ValueError(f"need 1 <= SHORT <= LONG, got {self.short}:{self.long}")
        if self.multiple < 1 or self.band < 1:
            raise ValueError(f"need multiple >= 1 and band >= 1, got {self.multiple}, {self.band}")

    @property
    def square_only(self) -> bool:
        """A plain ``S``: one square canvas, longer side resized to S."""
        return self.short == self.long

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """The canvases as (height, width): (square,) or (landscape, portrait, square)."""
        m = self.multiple
        if self.square_only:
            side = _round_up(self.long, m)
            return ((side, side),)
        side = _round_up(min(self.long, self.short * self.band), m)
        short, long = _round_up(self.short, m), _round_up(self.long, m)
        return ((short, long), (long, short), (side, side))

    def canvas_index(self, height: int, width: int) -> int:
        """Index into :attr:`shapes` of the canvas an image of this size goes on."""
        if self.square_only:
            return 0
        if width > height * self.band:
            return 0  # landscape
        if height > width * self.band:
            return 1  # portrait
        return 2

    def resized_shape(self, height: int, width: int, canvas: tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) of the image on its canvas: the aspect ratio kept, the size fitting the canvas.

        Args:
          height, width: the image's size (after EXIF rotation).
          canvas: (Hc, Wc) to fit instead of the image's own canvas (a size read from
            an annotation file that disagrees with the pixels still fits its batch).
        """
        if self.square_only:
            scale = self.long / max(height, width)
        else:
            scale = min(self.short / min(height, width), self.long / max(height, width))
        ch, cw = self.shapes[self.canvas_index(height, width)] if canvas is None else canvas
        scale = min(scale, ch / height, cw / width)  # never overflow the canvas after rounding
        return max(1, min(ch, int(round(height * scale)))), max(1, min(cw, int(round(width * scale))))

    def describe(self) -> str:
        """One line for a job's log, e.g. "800x1344 landscape, 1344x800 portrait, 1024x1024 square"."""
        if self.square_only:
            h, w = self.shapes[0]
            return f"{h}x{w} square"
        return ", ".join(f"{h}x{w} {name}" for (h, w), name in zip(self.shapes, ORIENTATIONS, strict=True))

    def __str__(self) -> str:
        return str(self.long) if self.square_only else f"{self.short}:{self.long}"


def parse_image_size(text: str | int, multiple: int = 32) -> Canvases:
    """``"S"`` or ``"SHORT:LONG"`` (or an int) to :class:`Canvases`.

    Raises:
      ValueError: not of that form, or sizes that are not positive, or SHORT > LONG.
    """
    parts = str(text).replace(" ", "").split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise ValueError(
            f"--image-size must be S or SHORT:LONG with positive integers (e.g. 512 or 800:1333), got {text!r}"
        )
    short, long = (values[0], values[0]) if len(values) == 1 else values
    if short > long:
        raise ValueError(f"--image-size SHORT:LONG needs SHORT <= LONG, got {text!r}")
    if len(values) == 1 and short % multiple:
        raise ValueError(f"--image-size {short} must be a multiple of {multiple}")
    return Canvases(short, long, multiple)


def padded_fraction(sizes: np.ndarray, canvases: Canvases) -> float:
    """The share of canvas pixels that are padding, over images of these (height, width)."""
    content = padded = 0
    for h, w in np.asarray(sizes).reshape(-1, 2):
        nh, nw = canvases.resized_shape(int(h), int(w))
        ch, cw = canvases.shapes[canvases.canvas_index(int(h), int(w))]
        content += nh * nw
        padded += ch * cw
    return 1.0 - content / padded if padded else 0.0


def grouped_batches(
    canvas_ids: np.ndarray, order: np.ndarray, batch_size: int, *, drop_remainder: bool, rng: np.random.Generator | None
) -> list[tuple[int, list[int]]]:
    """One epoch's batches, each from one canvas.

    Args:
      canvas_ids: [N] the canvas of every example.
      order: the epoch's order of example indices (a permutation of range(N)).
      batch_size: examples per batch (the global batch, across hosts).
      drop_remainder: drop each canvas's last incomplete batch; otherwise keep it
        (the loader pads it).
      rng: shuffles the order of the batches; None keeps them in order of their
        first example.

    Returns:
      [(canvas index, example indices)], a pure function of the arguments.
    """
    groups: dict[int, list[int]] = {}
    position = {int(index): pos for pos, index in enumerate(order)}
    for index in order:
        groups.setdefault(int(canvas_ids[index]), []).append(int(index))
    batches = []
    for canvas, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            if len(chunk) == batch_size or not drop_remainder:
                batches.append((canvas, chunk))
    if rng is None:
        return sorted(batches, key=lambda b: position[b[1][0]])
    return [batches[i] for i in rng.permutation(len(batches))]
