"""Greedy non-maximum suppression with static shapes.

The rule is the greedy NMS of the R-CNN family (Felzenszwalb et al., 2010; Girshick
et al., 2014) exactly as torchvision's ``ops.nms`` applies it: visit boxes by
decreasing score, keep a box unless a kept box overlaps it with IoU > threshold.

Greedy NMS is sequential, so a one-box-at-a-time loop is slow under XLA. We use the
blocked scheme of TensorFlow's ``tf.image.non_max_suppression_padded``: sort once,
cut the sorted boxes into tiles of ``TILE`` boxes, and per tile

1. drop the boxes that a box kept in an earlier tile overlaps (dense ``[T, T]``
   IoU blocks, only against the kept boxes, which we store compacted), then
2. settle the tile itself with a short fixed-point loop: box j survives if no
   surviving box i < j of the tile overlaps it. The dependence only points from
   lower to higher index, so the fixed point is unique and equals the greedy result;
   it takes as many rounds as the longest suppression chain, usually two or three.

No ``[N, N]`` matrix is built, the loop stops as soon as ``max_output`` boxes are
kept, and the output is padded to ``max_output`` with a ``valid`` mask.

``scatter_free=True`` selects a formulation for graph converters (ONNX), which have
no scatter that drops out-of-bounds indices and turn indexing with a loop counter
under ``vmap`` into gathers they cannot lower: ``lax.scan`` visits every tile, each
tile is checked against every earlier tile masked by that tile's kept boxes (not
against a compacted list), and the kept positions are compacted once at the end
with ``top_k``. It keeps the same boxes, with more work.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lucid_jax.ops.boxes import box_inter_union
from lucid_jax.ops.checks import (
    check_dtype,
    check_length,
    check_shape,
    check_static_count,
)

# Boxes per tile. On 2 CPU cores at 5k boxes, tiles of 128/256/512 took 8.6/7.7/11.0 ms
# (and 256 also won at 20k): larger tiles waste work on the fixed point and on
# not-yet-full blocks of kept boxes, smaller ones pay more loop iterations.
TILE = 256


def _check_inputs(fn, boxes, scores, iou_threshold, max_output, valid, idxs=None):
    shape = np.shape(boxes)
    check_shape(fn, "boxes", boxes, "[N, 4]", len(shape) == 2 and shape[1] == 4)
    check_dtype(fn, "boxes", boxes, "floating")
    n = shape[0]
    for name, arr in (("scores", scores), ("valid", valid), ("idxs", idxs)):
        if arr is not None:
            check_length(fn, name, arr, n, "N", "boxes")
    check_dtype(fn, "scores", scores, "floating")
    if idxs is not None:
        check_dtype(fn, "idxs", idxs, "integer")
    max_output = check_static_count(fn, "max_output", max_output)
    if not isinstance(iou_threshold, jax.core.Tracer) and not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"{fn}: iou_threshold must be in [0, 1], got {iou_threshold}")
    return max_output


def _float32_threshold(threshold):
    """The float32 ``f`` with ``iou > f`` exactly when ``iou > threshold`` for float32 IoUs.

    torchvision compares its float IoU against a double threshold; rounding 1/3 to
    the nearest float32 would flip the pairs whose IoU is float32(1/3). Rounding
    down does not.
    """
    if isinstance(threshold, jax.core.Tracer) or np.ndim(threshold) != 0:
        return threshold
    t = float(threshold)
    f = np.float32(t)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) > t else f


def _suppressed_by(a, b, threshold):
    """Whether boxes ``b`` overlap boxes ``a`` with IoU > threshold.

    Args:
      a: [5, T] rows x1, y1, x2, y2, area (coordinates as columns, so the [T, T]
        block vectorises along the lane axis).
      b: [5, S] same layout.

    Returns:
      [T, S] bool. The IoU is computed with torchvision's exact float32 expression
      so that borderline pairs are decided the same way; 0/0 gives NaN, which
      compares False, so degenerate boxes suppress nothing.
    """
    inter, union = box_inter_union(
        tuple(a[i][:, None] for i in range(4)),
        a[4][:, None],  # [T, 1]
        tuple(b[i][None] for i in range(4)),
        b[4][None],  # [1, S]
    )  # [T, S]
    return inter / union > threshold


def _nms_sorted(boxes, alive, threshold, max_output, tile):
    """Greedy NMS on boxes already sorted by decreasing score.

    Args:
      boxes: [Np, 4] xyxy, Np a multiple of ``tile``.
      alive: [Np] bool, False for padding and invalid boxes.

    Returns:
      (kept [Np] int32 positions of the kept boxes in sorted order, compacted at the
      front, count int32 scalar: how many of them there are, at most Np).
    """
    n_pad = boxes.shape[0]
    num_tiles = n_pad // tile
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [Np]
    cols = jnp.concatenate([boxes.T, area[None]], axis=0)  # [5, Np]
    tiles = cols.reshape(5, num_tiles, tile).transpose(1, 0, 2)  # [num_tiles, 5, T]
    alive = alive.reshape(num_tiles, tile)  # [num_tiles, T]
    lower = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # [T, T] i < j

    def tile_body(carry):
        t, count, kept, kept_cols = carry
        cur = tiles[t]  # [5, T]

        # 1. Suppression by the boxes kept in earlier tiles, one compacted block at a time.
        def block_body(state):
            b, live = state
            blk = lax.dynamic_slice_in_dim(kept_cols, b * tile, tile, axis=1)  # [5, T]
            is_kept = b * tile + jnp.arange(tile) < count  # [T]
            hit = _suppressed_by(blk, cur, threshold) & is_kept[:, None]  # [T_kept, T]
            return b + 1, live & ~jnp.any(hit, axis=0)

        num_blocks = (count + tile - 1) // tile
        _, live = lax.while_loop(lambda s: s[0] < num_blocks, block_body, (jnp.int32(0), alive[t]))

        # 2. Suppression inside the tile, iterated to its fixed point.
        sup = _suppressed_by(cur, cur, threshold) & lower  # [T, T]

        def fix_body(state):
            keep, _ = state
            new = live & ~jnp.any(sup & keep[:, None], axis=0)  # [T]
            return new, jnp.any(new != keep)

        keep, _ = lax.while_loop(lambda s: s[1], fix_body, (live, jnp.bool_(True)))

        # Append the tile's kept boxes behind the earlier ones; others go out of bounds.
        pos = jnp.where(keep, count + jnp.cumsum(keep) - 1, n_pad)  # [T]
        kept = kept.at[pos].set(t * tile + jnp.arange(tile, dtype=jnp.int32), mode="drop")
        kept_cols = kept_cols.at[:, pos].set(cur, mode="drop")
        return t + 1, count + jnp.sum(keep, dtype=jnp.int32), kept, kept_cols

    def tile_cond(carry):
        t, count, _, _ = carry
        return (t < num_tiles) & (count < max_output)

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros(n_pad, jnp.int32), jnp.zeros((5, n_pad), cols.dtype))
    _, count, kept, _ = lax.while_loop(tile_cond, tile_body, init)
    return kept, count


def _nms_sorted_scatter_free(boxes, alive, threshold, max_output, tile):
    """:func:`_nms_sorted` without scatters or gathers, for graph converters.

    Tiles and blocks are visited by ``lax.scan`` over static ranges, so under
    ``vmap`` the loop counters stay unbatched and no dynamic indexing (which
    ``vmap`` turns into gathers) is needed; blocks at or after the current tile are
    skipped with ``lax.cond``. Only the in-tile fixed point has a per-image stopping
    condition.

    Args:
      boxes: [Np, 4] xyxy, Np a multiple of ``tile``.
      alive: [Np] bool, False for padding and invalid boxes.

    Returns:
      (kept [min(max_output, Np)] int32 positions of the kept boxes in sorted order,
      compacted at the front, count int32 scalar: how many boxes are kept, which
      may exceed ``max_output``).
    """
    n_pad = boxes.shape[0]
    num_tiles = n_pad // tile
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [Np]
    cols = jnp.concatenate([boxes.T, area[None]], axis=0)  # [5, Np]
    tiles = cols.reshape(5, num_tiles, tile).transpose(1, 0, 2)  # [num_tiles, 5, T]
    alive = alive.reshape(num_tiles, tile)  # [num_tiles, T]
    lower = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # [T, T] i < j
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)  # [num_tiles]

    def tile_step(keep_all, x):  # keep_all: [num_tiles, T], rows >= t still False
        t, cur, live = x  # [], [5, T], [T]

        def block_step(live, y):
            b, blk, kept_b = y  # [], [5, T], [T]
            hit = lax.cond(
                b < t,
                lambda: jnp.any(_suppressed_by(blk, cur, threshold) & kept_b[:, None], axis=0),  # [T]
                lambda: jnp.zeros(tile, bool),
            )
            return live & ~hit, None

        live, _ = lax.scan(block_step, live, (tile_ids, tiles, keep_all))
        sup = _suppressed_by(cur, cur, threshold) & lower  # [T, T]

        # The state is uint8 (and keep_all is updated with | rather than a select):
        # under vmap this loop selects its state per image, and onnxruntime has no
        # Where for bool.
        def fix_body(state):
            keep, _ = state
            new = live & ~jnp.any(sup & (keep[:, None] > 0), axis=0)  # [T]
            return new.astype(jnp.uint8), jnp.any(new != (keep > 0)).astype(jnp.uint8)

        keep, _ = lax.while_loop(lambda s: s[1] > 0, fix_body, (live.astype(jnp.uint8), jnp.uint8(1)))
        return keep_all | ((tile_ids[:, None] == t) & (keep[None] > 0)), None

    keep_all, _ = lax.scan(tile_step, jnp.zeros((num_tiles, tile), bool), (tile_ids, tiles, alive))
    keep = keep_all.reshape(n_pad)  # [Np]
    # Kept positions ascending, then the others: all keys distinct and exact in float32.
    pos = jnp.arange(n_pad, dtype=jnp.float32)
    _, kept = lax.top_k(jnp.where(keep, -pos, -n_pad - pos), min(max_output, n_pad))
    return kept.astype(jnp.int32), jnp.sum(keep, dtype=jnp.int32)


def nms(boxes, scores, iou_threshold, max_output, *, valid=None, tile=TILE, scatter_free=False):
    """Greedy NMS for one image, keeping the same boxes as ``torchvision.ops.nms``.

    Args:
      boxes: [N, 4] xyxy, floating point (computed in float32).
      scores: [N] floating point.
      iou_threshold: a box is dropped when a kept box overlaps it with IoU > this,
        in [0, 1]. A Python number is compared exactly as torchvision does (as a
        double); a traced one is compared in float32.
      max_output: static length of the output.
      valid: optional [N] bool. Invalid boxes, and boxes whose score is not finite,
        are never kept and suppress nothing.
      tile: boxes per block of the blocked algorithm (speed only).
      scatter_free: use the formulation for graph converters (same result).

    Returns:
      keep: [max_output] int32 indices into ``boxes`` by decreasing score (ties:
        lower index first), padded with 0.
      keep_valid: [max_output] bool, True for the real entries of ``keep``.
    """
    max_output = _check_inputs("nms", boxes, scores, iou_threshold, max_output, valid)
    n = np.shape(boxes)[0]
    if n == 0 or max_output == 0:
        return jnp.zeros(max_output, jnp.int32), jnp.zeros(max_output, bool)
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores)
    alive = jnp.isfinite(scores)  # [N]
    if valid is not None:
        alive &= jnp.asarray(valid, bool)
    # -0.0 and 0.0 must tie as in torch; dead boxes sort last. The index as a second
    # sort key makes the order a stable descending sort.
    key = jnp.where(alive, -scores.astype(jnp.float32), jnp.inf)  # [N]
    key = jnp.where(key == 0, 0.0, key)
    _, order = lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=2)  # [N]

    tile = int(min(tile, max(8, -(-n // 8) * 8)))  # no tile larger than N (rounded up)
    n_pad = -(-n // tile) * tile
    sorted_boxes = jnp.pad(boxes[order], ((0, n_pad - n), (0, 0)))  # [Np, 4]
    sorted_alive = jnp.pad(alive[order], (0, n_pad - n))  # [Np]
    threshold = _float32_threshold(iou_threshold)
    nms_sorted = _nms_sorted_scatter_free if scatter_free else _nms_sorted
    kept, count = nms_sorted(sorted_boxes, sorted_alive, threshold, max_output, tile)

    kept = jnp.pad(kept, (0, max(0, max_output - n_pad)))[:max_output]  # [max_output]
    keep_valid = jnp.arange(max_output) < count
    keep = jnp.where(keep_valid, order[jnp.minimum(kept, n - 1)], 0)
    return keep.astype(jnp.int32), keep_valid


def batched_nms(boxes, scores, idxs, iou_threshold, max_output, *, valid=None, tile=TILE, scatter_free=False):
    """NMS run independently per category, as ``torchvision.ops.batched_nms``.

    Boxes of different categories are moved apart by ``idx * (span + 1)``, where
    ``span`` covers every valid coordinate, so they can never overlap and one plain
    NMS does all categories at once (the coordinate-offset trick of torchvision).

    Args:
      boxes: [N, 4] xyxy, floating point.
      scores: [N] floating point.
      idxs: [N] int, the category of each box (non-negative).
      iou_threshold, max_output, valid, tile, scatter_free: as :func:`nms`.

    Returns:
      (keep [max_output] int32, keep_valid [max_output] bool) as :func:`nms`, ordered
      by decreasing score across all categories.
    """
    max_output = _check_inputs("batched_nms", boxes, scores, iou_threshold, max_output, valid, idxs)
    if np.shape(boxes)[0] == 0 or max_output == 0:
        return jnp.zeros(max_output, jnp.int32), jnp.zeros(max_output, bool)
    boxes = jnp.asarray(boxes, jnp.float32)
    usable = jnp.isfinite(jnp.asarray(scores))  # [N]
    if valid is not None:
        usable &= jnp.asarray(valid, bool)
    # Garbage in padded rows must not blow up the offset, so take extremes over usable boxes.
    # With coordinates >= 0 this is torchvision's max + 1, bit for bit.
    hi = jnp.max(jnp.where(usable[:, None], boxes, 0.0))
    lo = jnp.min(jnp.where(usable[:, None], boxes, 0.0))
    offsets = jnp.asarray(idxs).astype(jnp.float32) * (hi - lo + 1.0)  # [N]
    return nms(
        boxes + offsets[:, None], scores, iou_threshold, max_output, valid=usable, tile=tile, scatter_free=scatter_free
    )
