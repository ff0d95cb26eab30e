"""Photometric distortion: brightness, contrast, saturation and hue, each applied with
probability 0.5, in the order of mmdetection's ``PhotoMetricDistortion`` (from SSD's
augmentation, Liu et al., ECCV 2016). Boxes do not move.

    image [H, W, 3] uint8 RGB -> float32
      -> brightness: + U(-32, 32)                          (p = 0.5), clip to [0, 255]
      -> contrast, first in half of the draws: x U(0.5, 1.5) (p = 0.5), clip
      -> to HSV: saturation x U(0.5, 1.5), clip to [0, 1]  (p = 0.5)
                 hue + U(-18, 18) degrees, modulo 360      (p = 0.5)
      -> back to RGB
      -> contrast, last in the other half                  (p = 0.5), clip
      -> rounded to uint8 [H, W, 3]

Unlike mmdetection's, it never permutes the channels (a red tree crown stays red),
and saturation is clipped to 1 before converting back. The draws come from the
example's generator, which the loader seeds by (seed, epoch, image), so the
distortion does not depend on batching or sharding and a resumed run draws the
same ones.
"""

from dataclasses import dataclass

import numpy as np

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18.0  # degrees


@dataclass(frozen=True)
class ColorJitter:
    """One draw of the distortion for one image; None skips a step.

    Attributes:
      brightness: added to every channel, in [0, 255] units.
      contrast: the factor every channel is multiplied by.
      contrast_first: the contrast step comes before the HSV steps (else after them).
      saturation: the factor of the HSV saturation.
      hue: degrees added to the HSV hue.
    """

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue: float | None


def draw_color_jitter(rng: np.random.Generator) -> ColorJitter:
    """Draw each step's coin and value, in a fixed order, from ``rng``."""

    def maybe(low: float, high: float) -> float | None:
        apply, value = rng.random() < 0.5, rng.uniform(low, high)  # both drawn, so the stream's use is fixed
        return float(value) if apply else None

    brightness = maybe(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = bool(rng.random() < 0.5)
    contrast = maybe(*CONTRAST_RANGE)
    saturation = maybe(*SATURATION_RANGE)
    hue = maybe(-HUE_DELTA, HUE_DELTA)
    return ColorJitter(brightness, contrast, contrast_first, saturation, hue)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] RGB in [0, 1] -> [..., 3] HSV: hue in [0, 1) (a turn), saturation and value in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    chroma = value - rgb.min(-1)
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(value == r, ((g - b) / safe) % 6, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(chroma > 0, hue / 6, 0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1), 0)
    return np.stack([hue, saturation, value], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    channel = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([channel(5), channel(3), channel(1)], -1)


def apply_color_jitter(image: np.ndarray, jitter: ColorJitter) -> np.ndarray:
    """Distort ``image`` [H, W, 3] uint8 RGB as ``jitter`` says; returns [H, W, 3] uint8."""
    x = image.astype(np.float32)
    if jitter.brightness is not None:
        x = np.clip(x + np.float32(jitter.brightness), 0, 255)
    if jitter.contrast is not None and jitter.contrast_first:
        x = np.clip(x * np.float32(jitter.contrast), 0, 255)
    if jitter.saturation is not None or jitter.hue is not None:
        hsv = rgb_to_hsv(x / 255)
        if jitter.saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(jitter.saturation), 0, 1)
        if jitter.hue is not None:
            hsv[..., 0] = (hsv[..., 0] + np.float32(jitter.hue / 360)) % 1
        x = hsv_to_rgb(hsv) * 255
    if jitter.contrast is not None and not jitter.contrast_first:
        x = np.clip(x * np.float32(jitter.contrast), 0, 255)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def random_color_jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Draw a distortion from ``rng`` and apply it to ``image`` [H, W, 3] uint8."""
    return apply_color_jitter(image, draw_color_jitter(rng))


def with_color_jitter(transform, example: dict, rng: np.random.Generator, **kwargs) -> dict:
    """Distort ``example["image"]``, then run the loader's ``transform(example, rng, **kwargs)``.

    The distortion draws from a child of ``rng`` (``rng.spawn``), which leaves ``rng``'s
    own stream as it was: the flips and jitters of a run with ``color`` are those of
    the same run without it.
    """
    (child,) = rng.spawn(1)
    return transform({**example, "image": random_color_jitter(child, np.asarray(example["image"]))}, rng, **kwargs)
