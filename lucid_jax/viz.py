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
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from lucid_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_DPI = 100
# Label text is never smaller than this many points (about 11 pixels at 100 dpi).
MIN_FONTSIZE = 8.0
# Ground-truth labels: white text on this dark, mostly opaque box, readable on any
# image and any class colour; the box's dashed edge is the class colour.
GT_LABEL_BACKGROUND = (0.0, 0.0, 0.0, 0.7)
# The height, in pixels, of the band under a grid that holds its legend.
LEGEND_BAND_PX = 30


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


def _label_width(text: str, fontsize: float, dpi: float) -> float:
    """A generous estimate of a label's width in pixels (DejaVu Sans averages about
    0.6 em per character; 0.7 leaves room), plus its box's padding."""
    return len(text) * 0.7 * fontsize * dpi / 72.0 + 4.0


def _label_x(x: float, text: str, fontsize: float, dpi: float, width: float) -> float:
    """The left end of a label starting at ``x``, moved left where it would run past the
    image's right edge, and never left of the image."""
    return float(max(0.0, min(x, width - _label_width(text, fontsize, dpi))))


def fit_for_drawing(image: np.ndarray, boxes, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The image shrunk so that its longer side is at most ``max_side`` pixels, and the
    boxes scaled with it (both unchanged when the image is that small already).

    Drawing renders a figure as large as the image; an 8000x6000 photograph would
    need gigabytes. The shrink averages pixel blocks (PIL's box filter).

    Args:
      image: [H, W, 3] uint8, or float in [0, 1] (shrunk as uint8).
      boxes: [K, 4] xyxy pixels of ``image``.
      max_side: the longest side drawn; None or 0: no limit.

    Returns:
      (image [h, w, 3] uint8, boxes [K, 4] float32 in its pixels).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    height, width = image.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return image, boxes
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL: (width, height)
    pixels = _to_display(image)
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255.0).astype(np.uint8)
    small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    sx, sy = size[0] / width, size[1] / height
    return small, boxes * np.array([sx, sy, sx, sy], np.float32)


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
      fontsize: label text size in points (at least ``MIN_FONTSIZE``).

    Every label lies inside the image: above its box where there is room, else just
    inside it, and moved left where it would run past the right edge. A box lower
    than its label (about 18 pixels at 8 points) is drawn without one, with a thinner
    edge, so that a crowd of small boxes stays visible. Ground-truth
    labels are white on a dark box with a dashed edge in the class colour, at the
    bottom of their box.

    Returns:
      The axes (``ax.figure`` is the figure, e.g. for ``savefig``).
    """
    pixels = _to_display(image)
    height, width = pixels.shape[:2]
    if ax is None:
        ax = blank_axes(height, width)
    fontsize = max(float(fontsize), MIN_FONTSIZE)
    figure = ax.get_figure(root=True)
    dpi = figure.dpi if figure is not None else DEFAULT_DPI
    line_px = fontsize * 1.6 * dpi / 72.0  # a label's height with its box, generously

    def outline(x1, y1, x2, y2, color, linestyle="-") -> None:
        """The box's edge, ``linewidth`` points wide, thinner on boxes under 8 edges across."""
        edge = float(min(linewidth, max(0.5, min(x2 - x1, y2 - y1) * 72.0 / dpi / 8.0)))
        ax.add_patch(
            Rectangle(
                (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=edge, linestyle=linestyle, snap=False
            )
        )

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
            outline(x1, y1, x2, y2, color, "--")
            if y2 - y1 < line_px:  # a box lower than its label: the label would hide it
                continue
            name = _name(label, class_names)
            ax.text(
                _label_x(max(x1, 0.0) + 2, name, fontsize, dpi, width),
                min(max(y2 - 2, line_px), height - 2),  # inside the image, at the box's bottom
                name,
                color="white",
                fontsize=fontsize,
                va="bottom",
                ha="left",
                clip_on=True,
                bbox={"facecolor": GT_LABEL_BACKGROUND, "edgecolor": color, "linestyle": "--", "pad": 1.5},
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
        outline(x1, y1, x2, y2, color)
        if y2 - y1 < line_px:  # a box lower than its label (a crowd, or a big image drawn shrunk): no label
            continue
        # Above the box, unless that would leave the image: then just inside it.
        above = y1 >= line_px
        text = f"{_name(labels[k], class_names)} {scores[k]:.2f}"
        ax.text(
            _label_x(x1, text, fontsize, dpi, width),
            max(y1, 0.0),
            text,
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
    legend: bool = False,
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
      legend: add a band of ``LEGEND_BAND_PX`` pixels under the grid saying that
        predictions are solid and the ground truth dashed.

    Returns:
      The figure that was saved.
    """
    images = denormalize(images) if normalized else np.asarray(images)
    num, height, width = images.shape[:3]
    ncols = max(1, min(ncols, num))
    nrows = math.ceil(num / ncols)
    band = LEGEND_BAND_PX if legend else 0
    total = nrows * height + band  # pixels
    fig = Figure(figsize=(ncols * width / dpi, total / dpi), dpi=dpi, facecolor="black")
    cell_h = height / total  # a cell's height as a fraction of the figure's
    for i in range(num):
        row, col = divmod(i, ncols)
        ax = fig.add_axes((col / ncols, 1.0 - (row + 1) * cell_h, 1.0 / ncols, cell_h))
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
    if legend:
        handles = [
            Line2D([], [], color="white", linewidth=2.0, label="prediction (class score)"),
            Line2D([], [], color="white", linewidth=2.0, linestyle="--", label="ground truth"),
        ]
        fig.legend(
            handles=handles,
            loc="center",
            bbox_to_anchor=(0.5, band / 2 / total),
            ncols=2,
            frameon=False,
            labelcolor="white",
            fontsize=MIN_FONTSIZE + 1,
            handlelength=3.0,
        )
    fig.savefig(os.fspath(path), dpi=dpi, facecolor=fig.get_facecolor())
    return fig


def save_detections(
    image, prediction: Mapping, path: str | os.PathLike, class_names=None, *, max_side: int | None = None, **kwargs
) -> Axes:
    """``draw_detections`` for one image's prediction dict, saved as a PNG of W x H pixels,
    or, where the longer side exceeds ``max_side``, shrunk to it with the boxes
    (:func:`fit_for_drawing`)."""
    image, boxes = fit_for_drawing(np.asarray(image), prediction["boxes"], max_side)
    ax = draw_detections(
        image,
        boxes,
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
