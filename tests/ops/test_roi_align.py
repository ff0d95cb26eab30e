"""RoIAlign and FPN level assignment against torchvision and a float64 loop reference."""

from collections import OrderedDict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.ops.roi_align import fpn_level_of_boxes, multiscale_roi_align, roi_align

TV_REASON = "torchvision is not installed; pip install -e '.[parity]' to run the parity tests"
TOL = dict(rtol=1e-5, atol=1e-5)

# Built once per module, so that tests sharing shapes share compilations.
_roi_align_jit = jax.jit(roi_align, static_argnames=("output_size", "spatial_scale", "sampling_ratio", "aligned"))
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5
_multiscale_jit = jax.jit(
    partial(multiscale_roi_align, strides=FPN_STRIDES), static_argnames=("output_size", "sampling_ratio", "aligned")
)


def pool(features, boxes, output_size=7, scale=0.25, sr=2, aligned=True):
    return _roi_align_jit(
        features, boxes, output_size=output_size, spatial_scale=scale, sampling_ratio=sr, aligned=aligned
    )


def pool_fpn(features, boxes, output_size=7, aligned=True):
    return _multiscale_jit(features, boxes, output_size=output_size, sampling_ratio=2, aligned=aligned)


def make_boxes(rng, n, map_hw, scale):
    """[n, 4] float32 image-pixel boxes: random (often partly off the map), plus one
    wholly right of the map, one wholly above it, and zero-width, zero-height and point boxes."""
    ih, iw = map_hw[0] / scale, map_hw[1] / scale
    xy = rng.uniform(-0.3, 1.1, (n, 2)) * (iw, ih)
    wh = rng.uniform(0.0, 0.7, (n, 2)) * (iw, ih)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [iw + 3 / scale, 1, iw + 9 / scale, ih / 2]  # more than a pixel right of the map
    boxes[1] = [2, -9 / scale, iw / 2, -3 / scale]  # above it
    boxes[2, 2] = boxes[2, 0]  # zero width
    boxes[3, 3] = boxes[3, 1]  # zero height
    boxes[4, 2:] = boxes[4, :2]  # a point
    return boxes.astype(np.float32)


def make_pyramid(rng, image_hw=(256, 320), channels=8, strides=(4, 8, 16, 32)):
    shapes = [(image_hw[0] // s, image_hw[1] // s, channels) for s in strides]
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def pyramid_boxes(rng, n, image_hw=(256, 320)):
    """Boxes with sqrt(area) from ~11 to ~700 pixels, so that every FPN level gets some."""
    side = 2.0 ** rng.uniform(3.5, 9.5, n)
    aspect = 2.0 ** rng.uniform(-1.5, 1.5, n)
    wh = np.stack([side * aspect, side / aspect], axis=1)
    xy = rng.uniform(-0.2, 0.9, (n, 2)) * (image_hw[1], image_hw[0])
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def to_torch_nchw(features):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(features, (2, 0, 1))[None]))


def to_rois(boxes):
    import torch

    return torch.from_numpy(np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], axis=1))


def ref_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign from its definition: float64 Python loops over RoIs, bins and samples."""
    f = np.asarray(features, np.float64)
    h, w, c = f.shape
    oh, ow = output_size
    s = sampling_ratio

    def bilinear(y, x):
        if y < -1.0 or y > h or x < -1.0 or x > w:  # more than a pixel off the map
            return np.zeros(c)
        y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
        y0, x0 = int(y), int(x)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        ly, lx = y - y0, x - x0
        top = (1 - lx) * f[y0, x0] + lx * f[y0, x1]
        bottom = (1 - lx) * f[y1, x0] + lx * f[y1, x1]
        return (1 - ly) * top + ly * bottom

    out = np.zeros((len(boxes), oh, ow, c))
    for r, box in enumerate(boxes):
        x_start, y_start, x_end, y_end = (float(v) * spatial_scale - (0.5 if aligned else 0.0) for v in box)
        roi_w, roi_h = x_end - x_start, y_end - y_start
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        for i in range(oh):
            for j in range(ow):
                for a in range(s):
                    for b in range(s):
                        y = y_start + (i + (a + 0.5) / s) * roi_h / oh
                        x = x_start + (j + (b + 0.5) / s) * roi_w / ow
                        out[r, i, j] += bilinear(y, x) / (s * s)
    return out


def ref_fpn_level(boxes, lo=2, hi=5):
    b = boxes.astype(np.float64)
    size = np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0.0))
    with np.errstate(divide="ignore"):
        return np.clip(np.floor(4 + np.log2(size / 224) + 1e-6), lo, hi).astype(np.int32)


# (seed, [H, W, C], R, output_size, spatial_scale, sampling_ratio, aligned)
PARITY_CASES = [
    (0, (24, 31, 8), 20, 7, 0.25, 2, True),
    (1, (24, 31, 8), 20, 7, 0.25, 2, False),
    (2, (24, 31, 8), 20, (5, 3), 1.0, 1, True),
    (3, (24, 31, 8), 20, (5, 3), 0.5, 3, False),
    (4, (17, 9, 3), 20, 4, 0.5, 3, True),
    (5, (24, 31, 64), 45, 7, 0.25, 2, True),  # several lax.map chunks, the last padded
    (6, (24, 31, 64), 45, 7, 1.0, 1, False),
    (7, (150, 170, 4), 40, 7, 1.0, 2, True),  # large coordinates: an ulp off in a sample point shows
]


@pytest.mark.parametrize("seed,shape,n,output_size,scale,sr,aligned", PARITY_CASES)
def test_roi_align_matches_torchvision(seed, shape, n, output_size, scale, sr, aligned):
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    rng = np.random.default_rng(seed)
    features = rng.standard_normal(shape).astype(np.float32)
    boxes = make_boxes(rng, n, shape[:2], scale)
    ours = pool(features, boxes, output_size, scale, sr, aligned)
    x, rois = to_torch_nchw(features), to_rois(boxes)
    theirs = torchvision.ops.roi_align(x, rois, output_size, scale, sr, aligned)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1), **TOL)
    assert np.all(np.asarray(ours)[0] == 0) and np.all(np.asarray(ours)[1] == 0)  # wholly off the map


@pytest.mark.parametrize("seed,aligned,sr,scale", [(10, True, 2, 0.5), (11, False, 3, 1.0), (12, True, 1, 1)])
def test_roi_align_matches_float64_loops(seed, aligned, sr, scale):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((11, 14, 5)).astype(np.float32)
    boxes = make_boxes(rng, 12, (11, 14), scale)
    ours = pool(features, boxes, (4, 3), scale, sr, aligned)
    np.testing.assert_allclose(ours, ref_roi_align(features, boxes, (4, 3), scale, sr, aligned), **TOL)


def test_roi_align_of_a_ramp_is_the_mean_sample_coordinate():
    h, w = 20, 30
    ramp = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)  # [H, W, 2]
    ramp = ramp.astype(np.float32)
    boxes = np.array([[8.0, 4.0, 100.0, 60.0], [20.0, 30.0, 21.0, 31.5]], np.float32)  # inside, at scale 1/4
    out = np.asarray(pool(ramp, boxes, (4, 5)))  # channel 0 is y, channel 1 is x
    start, size = boxes[:, :2] / 4 - 0.5, (boxes[:, 2:] - boxes[:, :2]) / 4  # [R, 2] as (x, y)
    want_y = start[:, 1, None] + (np.arange(4) + 0.5) * size[:, 1, None] / 4  # [R, oh]
    want_x = start[:, 0, None] + (np.arange(5) + 0.5) * size[:, 0, None] / 5  # [R, ow]
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(want_y[:, :, None], (2, 4, 5)), **TOL)
    np.testing.assert_allclose(out[..., 1], np.broadcast_to(want_x[:, None, :], (2, 4, 5)), **TOL)


def test_roi_align_grad_matches_torch_autograd():
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    import torch

    rng = np.random.default_rng(20)
    features = rng.standard_normal((24, 31, 8)).astype(np.float32)
    boxes = make_boxes(rng, 20, (24, 31), 0.25)
    cotangent = rng.standard_normal((20, 7, 7, 8)).astype(np.float32)
    loss = lambda f: jnp.sum(pool(f, boxes) * cotangent)
    ours = jax.grad(loss)(features)
    x = to_torch_nchw(features).requires_grad_(True)
    out = torchvision.ops.roi_align(x, to_rois(boxes), 7, 0.25, 2, True)
    (out * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(np.asarray(ours), x.grad[0].numpy().transpose(1, 2, 0), **TOL)


def test_fpn_level_matches_level_mapper_and_reference():
    sides = np.array([1, 56, 111.5, 112, 112.5, 223.9, 224, 224.1, 447, 448, 449, 896, 2000])
    xy = np.array([[0.0, 0.0], [37.25, 11.5]])
    squares = [np.concatenate([o, o + s]) for o in xy for s in sides]
    rects = [[0, 0, 56, 224], [0, 0, 112, 448], [5, 5, 901, 229], [3, 3, 3, 50]]  # sqrt(area): 112 224 448 0
    # o + side rounds so that the float32 sides are ulps short of 112, 224, 448: only
    # LevelMapper's eps keeps these on the upper level.
    short = [[o, o, o + d, o + d] for o, d in [(400.1, 112), (288.1, 224), (290.6, 224), (1600.4, 448)]]
    random = pyramid_boxes(np.random.default_rng(30), 40)
    boxes = np.concatenate([np.array(squares), np.array(rects + short), random]).astype(np.float32)
    ours = np.asarray(jax.jit(fpn_level_of_boxes)(boxes))
    np.testing.assert_array_equal(ours, ref_fpn_level(boxes))
    assert ours.dtype == np.int32 and set(ours[:13]) == {2, 3, 4, 5}
    np.testing.assert_array_equal(ours[[3, 6, 9]], [3, 4, 5])  # exactly on the boundaries: the upper level
    np.testing.assert_array_equal(ours[len(squares) + 4 : len(squares) + 8], [3, 4, 4, 5])
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    import torch

    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    np.testing.assert_array_equal(ours, mapper([torch.from_numpy(boxes)]).numpy() + 2)


def test_multiscale_matches_torchvision_and_keeps_roi_order():
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    import torch

    rng = np.random.default_rng(40)
    feats, boxes = make_pyramid(rng), pyramid_boxes(rng, 60)
    assert set(np.asarray(fpn_level_of_boxes(boxes)).tolist()) == {2, 3, 4, 5}
    ours = np.asarray(pool_fpn(feats, boxes, aligned=False))
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    named = OrderedDict((str(i), to_torch_nchw(f)) for i, f in enumerate(feats))
    theirs = pooler(named, [torch.from_numpy(boxes)], [(256, 320)]).numpy().transpose(0, 2, 3, 1)
    for r in range(len(boxes)):
        np.testing.assert_allclose(ours[r], theirs[r], err_msg=f"RoI {r}", **TOL)
    perm = rng.permutation(len(boxes))
    permuted = np.asarray(pool_fpn(feats, boxes[perm], aligned=False))
    np.testing.assert_array_equal(permuted, ours[perm])


def test_multiscale_aligned_matches_roi_align_on_each_level():
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    rng = np.random.default_rng(41)
    feats, boxes = make_pyramid(rng), pyramid_boxes(rng, 30)
    levels = np.asarray(fpn_level_of_boxes(boxes))
    ours = np.asarray(pool_fpn(feats, boxes, (7, 5)))
    for r, level in enumerate(levels):
        f = to_torch_nchw(feats[level - 2])
        want = torchvision.ops.roi_align(f, to_rois(boxes[r : r + 1]), (7, 5), 2.0**-level, 2, True)
        np.testing.assert_allclose(ours[r], want.numpy()[0].transpose(1, 2, 0), err_msg=f"RoI {r}", **TOL)


def test_multiscale_grad_matches_torch_autograd():
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    import torch

    rng = np.random.default_rng(42)
    feats, boxes = make_pyramid(rng), pyramid_boxes(rng, 60)
    cotangent = rng.standard_normal((60, 7, 7, 8)).astype(np.float32)
    loss = lambda fs: jnp.sum(pool_fpn(fs, boxes, aligned=False) * cotangent)
    ours = jax.grad(loss)(feats)
    named = OrderedDict((str(i), to_torch_nchw(f).requires_grad_(True)) for i, f in enumerate(feats))
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    out = pooler(named, [torch.from_numpy(boxes)], [(256, 320)])
    (out * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    for level, g in enumerate(ours):
        np.testing.assert_allclose(np.asarray(g), named[str(level)].grad[0].numpy().transpose(1, 2, 0), **TOL)


def test_vmap_over_images_matches_per_image_calls():
    rng = np.random.default_rng(50)
    features = rng.standard_normal((2, 24, 31, 64)).astype(np.float32)
    boxes = np.stack([make_boxes(rng, 45, (24, 31), 0.25) for _ in range(2)])
    batched = np.asarray(jax.vmap(pool)(features, boxes))
    for i in range(2):
        np.testing.assert_allclose(batched[i], np.asarray(pool(features[i], boxes[i])), **TOL)
    feats = [make_pyramid(rng) for _ in range(2)]
    pboxes = np.stack([pyramid_boxes(rng, 30) for _ in range(2)])
    stacked = [np.stack(level) for level in zip(*feats)]
    batched = np.asarray(jax.vmap(pool_fpn)(stacked, pboxes))
    for i in range(2):
        np.testing.assert_allclose(batched[i], np.asarray(pool_fpn(feats[i], pboxes[i])), **TOL)


def test_jit_compiles_once_per_shape(caplog):
    traces = []

    def pool_both(feats, boxes):
        traces.append(1)
        return multiscale_roi_align(feats, boxes, strides=FPN_STRIDES) + roi_align(feats[0], boxes, 7, 0.25)

    jitted = jax.jit(pool_both)
    outs = []
    with jax.log_compiles(), caplog.at_level("WARNING"):
        for seed in (60, 61, 62):
            rng = np.random.default_rng(seed)
            outs.append(np.asarray(jitted(make_pyramid(rng), pyramid_boxes(rng, 30))))
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(pool_both)")]
    assert len(traces) == 1 and len(compiles) == 1
    assert not np.allclose(outs[0], outs[1])  # new data really went through


def test_export_for_cpu_cuda_tpu():
    rng = np.random.default_rng(70)
    feats, boxes = make_pyramid(rng, channels=16), pyramid_boxes(rng, 40)
    specs = [jax.ShapeDtypeStruct(f.shape, jnp.float32) for f in feats]
    box_spec = jax.ShapeDtypeStruct(boxes.shape, jnp.float32)
    platforms = ("cpu", "cuda", "tpu")
    pool = partial(multiscale_roi_align, strides=FPN_STRIDES)
    exported = jax.export.export(jax.jit(pool), platforms=platforms)(specs, box_spec)
    want = pool(feats, boxes)
    np.testing.assert_allclose(np.asarray(exported.call(feats, boxes)), np.asarray(want), **TOL)
    single = jax.jit(partial(roi_align, output_size=7, spatial_scale=0.25))
    assert jax.export.export(single, platforms=platforms)(specs[0], box_spec).platforms == platforms


F = np.zeros((8, 8, 4), np.float32)
B = np.zeros((3, 4), np.float32)
P = [np.zeros((16 // 2**i, 16 // 2**i, 4), np.float32) for i in range(4)]
RA, MS = roi_align, partial(multiscale_roi_align, strides=FPN_STRIDES)
SHAPE_HWC, SHAPE_R4 = r"must have shape \[H, W, C\]", r"boxes must have shape \[R, 4\]"


@pytest.mark.parametrize(
    "fn,args,kwargs,error,match",
    [
        (RA, (F[None], B, 7, 1.0), {}, ValueError, r"features " + SHAPE_HWC + r", got \(1, 8, 8, 4\)"),
        (RA, (np.zeros((0, 3, 4), np.float32), B, 7, 1.0), {}, ValueError, "features " + SHAPE_HWC),
        (RA, (F.astype(np.int32), B, 7, 1.0), {}, TypeError, "features must be a floating"),
        (RA, (F, np.zeros((3, 5), np.float32), 7, 1.0), {}, ValueError, SHAPE_R4),
        (RA, (F, np.zeros((4,), np.float32), 7, 1.0), {}, ValueError, SHAPE_R4),
        (RA, (F, B.astype(np.int32), 7, 1.0), {}, TypeError, "boxes must be a floating"),
        (RA, (F, B, 0, 1.0), {}, ValueError, "output_size must be"),
        (RA, (F, B, (7, 7, 7), 1.0), {}, ValueError, "output_size must be"),
        (RA, (F, B, 7.0, 1.0), {}, ValueError, "output_size must be"),
        (RA, (F, B, 7, 1.0), dict(sampling_ratio=0), ValueError, "sampling_ratio must be >= 1.*static"),
        (RA, (F, B, 7, 1.0), dict(sampling_ratio=-1), ValueError, "sampling_ratio must be >= 1"),
        (RA, (F, B, 7, 1.0), dict(sampling_ratio=2.0), TypeError, "sampling_ratio must be an int"),
        (RA, (F, B, 7, 0.0), {}, ValueError, "spatial_scale must be"),
        (MS, (P[:3], B), {}, ValueError, "3 features for 4 strides"),
        (MS, (np.zeros((4, 8, 8, 4), np.float32), B), {}, TypeError, "features must be a list"),
        (MS, (P[:3] + [np.zeros((2, 2, 5), np.float32)], B), {}, ValueError, "one channel count"),
        (MS, (P[:3] + [np.zeros((2, 2), np.float32)], B), {}, ValueError, r"features\[3\] " + SHAPE_HWC),
        (MS, (P[:3] + [P[3].astype(np.float16)], B), {}, TypeError, "features must share one dtype"),
        (MS, (P, B), dict(strides=(4, 8, 16, 24)), ValueError, "strides must be consecutive powers of two"),
        (MS, (P, B), dict(sampling_ratio=0), ValueError, "sampling_ratio must be >= 1"),
        (MS, (P, B), dict(output_size=(7,)), ValueError, "output_size must be"),
        (MS, (P, B[:, :3]), {}, ValueError, SHAPE_R4),
        (fpn_level_of_boxes, (B[None],), {}, ValueError, SHAPE_R4),
        (fpn_level_of_boxes, (B.astype(np.int64),), {}, TypeError, "boxes must be a floating"),
    ],
)
def test_bad_input_fails_at_trace_time(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda: fn(*args, **kwargs)).trace()  # raises while tracing, before anything is compiled
