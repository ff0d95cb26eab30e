"""Trace-time validation of the detector's inputs.

Every check here looks only at shapes and dtypes, so it runs once while tracing and
costs nothing inside a compiled function.
"""

import jax
import jax.numpy as jnp
import numpy as np


def check_images(images, *, multiple: int, channels_last: bool = False) -> jax.Array:
    """Validate float images and return them in the model's internal layout, NHWC.

    This is the one place where the layout is decided. The public API takes Lucid's
    channels-first ``[B, 3, H, W]``; ``channels_last=True`` hands ``[B, H, W, 3]``
    (what the Loader and the uint8 serving function produce) straight in, with no
    transpose on the way to the first convolution.

    Args:
      images: [B, 3, H, W] float array (Lucid's layout), or [B, H, W, 3] with
        ``channels_last``.
      multiple: H and W must be divisible by this; the detector passes its
        backbone's ``size_divisibility`` (the largest RoI stride).
      channels_last: the images are [B, H, W, 3].

    Returns:
      [B, H, W, 3] array, same dtype.

    Raises:
      TypeError: images are not a floating-point array.
      ValueError: wrong rank, channels not in dimension 1, or H/W not multiples.
    """
    shape = tuple(np.shape(images))
    dtype = getattr(images, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"images must be a floating-point array of shape [B, 3, H, W], got dtype {dtype}; "
            "convert with images.astype(np.float32) (and normalise) first"
        )
    if channels_last:
        if len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3] with channels_last=True, got {shape}")
        h, w = shape[1], shape[2]
    elif len(shape) != 4:
        raise ValueError(f"images must have shape [B, 3, H, W], got {shape}")
    elif shape[1] != 3:
        if shape[-1] == 3:
            raise ValueError(
                f"images must have shape [B, 3, H, W] (channels first, Lucid's layout), got {shape}, "
                "which looks like NHWC; pass images.transpose(0, 3, 1, 2), or channels_last=True"
            )
        raise ValueError(f"images must have 3 channels in dimension 1, [B, 3, H, W], got {shape}")
    else:
        h, w = shape[2], shape[3]
    if h % multiple or w % multiple:
        raise ValueError(
            f"images height and width must be multiples of {multiple}, got {h}x{w} in shape {shape}; "
            "pad them (bottom/right) to a multiple and pass the true sizes as image_sizes"
        )
    return jnp.asarray(images) if channels_last else jnp.transpose(jnp.asarray(images), (0, 2, 3, 1))


def check_image_sizes(image_sizes, batch: int, height: int, width: int) -> jax.Array:
    """Validate ``image_sizes`` and default it to the padded size.

    Args:
      image_sizes: None or [B, 2] (height, width) of each image before padding.
      batch, height, width: the padded batch's shape.

    Returns:
      [B, 2] float32 (height, width).
    """
    if image_sizes is None:
        return jnp.broadcast_to(jnp.asarray([height, width], jnp.float32), (batch, 2))
    shape = tuple(np.shape(image_sizes))
    if shape != (batch, 2):
        raise ValueError(f"image_sizes must have shape [B, 2] = ({batch}, 2) as (height, width), got {shape}")
    return jnp.asarray(image_sizes, jnp.float32)


def check_targets(targets, images) -> int:
    """Validate the shapes and dtypes of padded targets against the images.

    Args:
      targets: {"boxes": [B, M, 4] float, "labels": [B, M] int, "valid": [B, M] bool}.
      images: [B, 3, H, W] or [B, H, W, 3] (only B is read).

    Returns:
      B.
    """
    if not isinstance(targets, dict) or not {"boxes", "labels", "valid"} <= set(targets):
        got = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
        raise ValueError(
            f'targets must be a dict with "boxes" [B, M, 4], "labels" [B, M] and "valid" [B, M], got {got}'
        )
    b = np.shape(images)[0]
    boxes, labels, valid = (np.shape(targets[k]) for k in ("boxes", "labels", "valid"))
    if len(boxes) != 3 or boxes[-1] != 4 or boxes[0] != b:
        raise ValueError(f'targets["boxes"] must have shape [B, M, 4] with B = {b} images, got {boxes}')
    m = boxes[1]
    for name, shape in (("labels", labels), ("valid", valid)):
        if shape != (b, m):
            raise ValueError(
                f'targets["{name}"] must have shape [B, M] = ({b}, {m}) like targets["boxes"], got {shape}'
            )
    if not jnp.issubdtype(jnp.result_type(targets["boxes"]), jnp.floating):
        raise TypeError(f'targets["boxes"] must be floating point, got {jnp.result_type(targets["boxes"])}')
    if not jnp.issubdtype(jnp.result_type(targets["labels"]), jnp.integer):
        raise TypeError(f'targets["labels"] must be integers, got {jnp.result_type(targets["labels"])}')
    return b


def ground_truth(targets, images) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Checked, typed ground truth: boxes [B, M, 4] float32, labels [B, M] int32 and
    valid [B, M] bool. An empty box has no regression target, so it counts as padding."""
    check_targets(targets, images)
    boxes = jnp.asarray(targets["boxes"], jnp.float32)
    valid = jnp.asarray(targets["valid"], bool) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return boxes, jnp.asarray(targets["labels"], jnp.int32), valid
