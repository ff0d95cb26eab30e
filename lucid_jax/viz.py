"""Drawing detections with matplotlib, off-screen.

Figures are built from ``matplotlib.figure.Figure`` and never through pyplot, so
nothing here selects a backend or opens a window: saving renders with Agg, and a
notebook shows a returned figure through its own display hook.

Boxes are continuous pixel coordinates, xyxy (as in torchvision): pixel ``i``
covers ``[i, i + 1)``, so the image is drawn with ``extent=(0, W, H, 0)`` and a
box edge at ``x1`` lies on the boundary between pixel columns ``x1 - 1`` and ``x1``.
Pixel snapping is turned off for boxes: Agg would otherwise move each edge by
half a pixel onto a pixel centre.
"""

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lucid_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_DPI = 100


def denormalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Undo the model's input normalisation.

    Args:
      image: [..., H, W, 3] float, ``(rgb / 255 - mean) / std`` (batched or not):
        the Loader's channels-last images.
      mean, std: the per-channel statistics it was normalised with (ImageNet's).

    Returns:
      [..., H, W, 3] uint8 RGB.
    """
    x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def class_color(label: int) -> tuple[float, float, float]:
    """A fixed RGB colour in [0, 1] for a class id.

    tab20 holds ten hue pairs (dark, light); classes 1-10 take the dark shades and
    11-20 the light ones, so neighbouring class ids never share a hue.
    """
    k = (int(label) - 1) % 20
    r, g, b = colormaps["tab20"]((2 * k) % 20 + k // 10)[:3]
    return r, g, b


def _to_display(image) -> np.ndarray:
    """[H, W, 3] uint8, or float in [0, 1] -> an array imshow shows unscaled."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3]; got shape {image.shape} (use denormalize for model inputs)")
    return image if image.dtype == np.uint8 else np.clip(image.astype(np.float32), 0.0, 1.0)


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def blank_axes(height: int, width: int, dpi: int = DEFAULT_DPI) -> Axes:
    """Axes filling a new figure of exactly ``width`` x ``height`` pixels at ``dpi``."""
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    return fig.add_axes((0.0, 0.0, 1.0, 1.0))


def draw_detections(
    image,
    boxes,
    labels,
    scores,
    valid=None,
    class_names: Sequence[str] | None = None,
    *,
    score_thresh: float = 0.0,
    ax: Axes | None = None,
    gt_boxes=None,
    gt_labels=None,
    gt_valid=None,
    linewidth: float = 2.0,
    fontsize: float = 8.0,
) -> Axes:
    """Draw one image with its detections (and optionally its ground truth).

    Args:
      image: [H, W, 3] uint8, or float in [0, 1].
      boxes: [K, 4] xyxy pixels.
      labels: [K] int class ids (1..C-1; 0 is the background).
      scores: [K] float.
      valid: [K] bool, the padding mask of the detector's output; None: all valid.
      class_names: names indexed by class id (index 0 the background); None: ids.
      score_thresh: detections scoring below it are not drawn.
      ax: axes to draw on; None: a new figure of exactly W x H pixels at 100 dpi.
      gt_boxes: [M, 4] xyxy ground-truth boxes, drawn dashed, or None.
      gt_labels: [M] int, their classes.
      gt_valid: [M] bool padding mask of the ground truth; None: all valid.
      linewidth: box edge width in points.
      fontsize: label text size in points.

    Returns:
      The axes (``ax.figure`` is the figure, e.g. for ``savefig``).
    """
    pixels = _to_display(image)
    height, width = pixels.shape[:2]
    if ax is None:
        ax = blank_axes(height, width)
    ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()

    if gt_boxes is not None:
        gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)  # [M, 4]
        gt_labels = np.zeros(len(gt_boxes), int) if gt_labels is None else np.asarray(gt_labels).reshape(-1)
        keep = np.ones(len(gt_boxes), bool) if gt_valid is None else np.asarray(gt_valid, bool).reshape(-1)
        for (x1, y1, x2, y2), label in zip(gt_boxes[keep], gt_labels[keep]):
            color = class_color(label)
            ax.add_patch(
                Rectangle(
                    (x1, y1),
                    x2 - x1,
                    y2 - y1,
                    fill=False,
                    edgecolor=color,
                    linewidth=linewidth,
                    linestyle="--",
                    snap=False,
                )
            )
            ax.text(
                x1 + 2,
                y2 - 2,
                _name(label, class_names),
                color=color,
                fontsize=fontsize * 0.9,
                va="bottom",
                ha="left",
                clip_on=True,
            )

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)  # [K, 4]
    labels = np.asarray(labels).reshape(-1)  # [K]
    scores = np.asarray(scores, np.float32).reshape(-1)  # [K]
    keep = scores >= score_thresh
    if valid is not None:
        keep &= np.asarray(valid, bool).reshape(-1)
    # Lowest score first, so the most confident boxes and labels end up on top.
    for k in np.argsort(scores, kind="stable"):
        if not keep[k]:
            continue
        x1, y1, x2, y2 = boxes[k]
        color = class_color(labels[k])
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth, snap=False)
        )
        # Above the box, unless that would leave the image: then just inside it.
        above = y1 >= fontsize * 1.6
        ax.text(
            x1,
            y1,
            f"{_name(labels[k], class_names)} {scores[k]:.2f}",
            color="white",
            fontsize=fontsize,
            va="bottom" if above else "top",
            ha="left",
            clip_on=True,
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0},
        )
    return ax


def _select(tree: Mapping | None, index: int) -> dict | None:
    return None if tree is None else {k: np.asarray(v)[index] for k, v in tree.items()}


def save_detections_grid(
    images,
    predictions: Mapping,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    targets: Mapping | None = None,
    *,
    ncols: int = 4,
    score_thresh: float = 0.0,
    normalized: bool = False,
    dpi: int = DEFAULT_DPI,
) -> Figure:
    """Write a PNG grid: one cell per image, each at its native pixel size.

    Args:
      images: [N, H, W, 3] uint8 or float in [0, 1]; with ``normalized=True``,
        the Loader's normalised images [N, H, W, 3] instead.
      predictions: the detector's padded output {"boxes": [N, K, 4],
        "scores": [N, K], "labels": [N, K], "valid": [N, K]}.
      path: the PNG file to write.
      class_names: names indexed by class id, or None.
      targets: optional ground truth {"boxes": [N, M, 4], "labels": [N, M],
        "valid": [N, M]}, drawn dashed.
      ncols: cells per row (fewer if there are fewer images).
      score_thresh: detections scoring below it are not drawn.
      normalized: ``images`` are normalised model inputs (see ``denormalize``).
      dpi: resolution; the PNG is ``ncols * W`` x ``nrows * H`` pixels at any dpi.

    Returns:
      The figure that was saved.
    """
    images = denormalize(images) if normalized else np.asarray(images)
    num, height, width = images.shape[:3]
    ncols = max(1, min(ncols, num))
    nrows = math.ceil(num / ncols)
    fig = Figure(figsize=(ncols * width / dpi, nrows * height / dpi), dpi=dpi, facecolor="black")
    for i in range(num):
        row, col = divmod(i, ncols)
        ax = fig.add_axes((col / ncols, 1.0 - (row + 1) / nrows, 1.0 / ncols, 1.0 / nrows))
        pred, gt = _select(predictions, i), _select(targets, i)
        assert pred is not None
        draw_detections(
            images[i],
            pred["boxes"],
            pred["labels"],
            pred["scores"],
            pred.get("valid"),
            class_names,
            score_thresh=score_thresh,
            ax=ax,
            gt_boxes=None if gt is None else gt["boxes"],
            gt_labels=None if gt is None else gt["labels"],
            gt_valid=None if gt is None else gt.get("valid"),
        )
    fig.savefig(os.fspath(path), dpi=dpi, facecolor=fig.get_facecolor())
    return fig


def save_detections(image, prediction: Mapping, path: str | os.PathLike, class_names=None, **kwargs) -> Axes:
    """``draw_detections`` for one image's prediction dict, saved as a PNG of W x H pixels."""
    ax = draw_detections(
        image,
        prediction["boxes"],
        prediction["labels"],
        prediction["scores"],
        prediction.get("valid"),
        class_names,
        **kwargs,
    )
    figure = ax.get_figure(root=True)
    assert figure is not None
    figure.savefig(os.fspath(path), dpi=figure.dpi)
    return ax
