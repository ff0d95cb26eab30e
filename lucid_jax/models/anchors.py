"""Anchors (Ren et al., "Faster R-CNN", NeurIPS 2015, section 3.1.1) on an FPN.

Each pyramid level gets anchors of its own sizes (FPN paper, section 4.1) and of
every aspect ratio, centred on the top-left corner of each feature cell, in the
order (y, x, anchor), which is how the RPN head's outputs are flattened.

Cells are spaced by each level's actual stride per axis, ``canvas // grid``, as
torchvision's ``AnchorGenerator`` spaces them: the padded input's height (width)
divided by the feature map's. That is the nominal stride wherever it divides the
canvas, and less on a ceil-sized level such as P6 when H/32 is odd.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def octave_sizes(base_sizes: Sequence[float], scales_per_octave: int = 3) -> tuple[tuple[float, ...], ...]:
    """Sizes base * 2^(k / scales_per_octave) for each level's base size.

    >>> octave_sizes((32,), 3)  # ((32.0, 40.3..., 50.7...),)
    """
    return tuple(tuple(float(b) * 2.0 ** (k / scales_per_octave) for k in range(scales_per_octave)) for b in base_sizes)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round_to_int: bool = False) -> np.ndarray:
    """Anchors centred on (0, 0) for one level.

    An aspect ratio is height / width; the anchor keeps the area size^2. The order
    is ratio-major: all sizes of the first ratio, then the next ratio.

    Args:
      sizes: anchor sizes (sqrt of area) in pixels, e.g. (32, 40.3, 50.8).
      aspect_ratios: e.g. (0.5, 1.0, 2.0).
      round_to_int: round the corners to integers (torchvision does).

    Returns:
      [len(aspect_ratios) * len(sizes), 4] float32 xyxy.
    """
    side = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * side[None, :]).reshape(-1)  # [A]
    hs = (h_ratios[:, None] * side[None, :]).reshape(-1)  # [A]
    anchors = np.stack([-ws, -hs, ws, hs], axis=1) / 2
    if round_to_int:
        anchors = np.round(anchors)
    return anchors.astype(np.float32)


def level_stride(canvas_size: tuple[int, int], grid_size: tuple[int, int]) -> tuple[int, int]:
    """A level's actual stride per axis, (canvas_h // grid_h, canvas_w // grid_w).

    Both sizes are static shapes (Python ints), so this costs nothing in a trace.

    >>> level_stride((160, 160), (3, 3))  # P6 of a 160x160 canvas
    (53, 53)
    """
    (ch, cw), (gh, gw) = canvas_size, grid_size
    return int(ch) // int(gh), int(cw) // int(gw)


def grid_anchors(base: np.ndarray, height: int, width: int, stride: tuple[int, int]) -> jnp.ndarray:
    """Shift one level's cell anchors over its feature grid.

    Built from iota inside the compiled program rather than stored as a constant,
    so large images do not embed megabytes of anchors in the executable.

    Args:
      base: [A, 4] cell anchors.
      height, width: feature map size of the level.
      stride: (stride_y, stride_x) in pixels, see ``level_stride``.

    Returns:
      [height * width * A, 4] float32 xyxy, ordered (y, x, anchor).
    """
    stride_y, stride_x = stride
    ys = jnp.arange(height, dtype=jnp.float32) * stride_y  # [H]
    xs = jnp.arange(width, dtype=jnp.float32) * stride_x  # [W]
    sy, sx = jnp.meshgrid(ys, xs, indexing="ij")  # [H, W]
    shifts = jnp.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)  # [HW, 1, 4]
    return (shifts + jnp.asarray(base)[None]).reshape(-1, 4)
