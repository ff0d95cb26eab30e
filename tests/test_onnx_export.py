"""The ONNX graph of the mini detector against JAX's own serving function.

The comparison needs jax2onnx and onnxruntime (the ``onnx`` extra); the JAX-only
check that the scatter-free NMS leaves the detections unchanged runs everywhere.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.inference import serving_function
from lucid_jax.models import get_model
from lucid_jax.onnx_export import OUTPUT_NAMES, export_onnx

CANVAS = 128
ONNX_MISSING = [m for m in ("jax2onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(
    bool(ONNX_MISSING),
    reason=f"{' and '.join(ONNX_MISSING)} not installed; the onnx extra has its own environment (see .ci/run)",
)


@pytest.fixture(scope="module")
def detector():
    """(model, variables, images uint8 [1, 128, 128, 3], image_sizes int32 [1, 2], JAX's detections)."""
    model = get_model("faster_rcnn_mini_fpn", num_classes=4)
    x = jnp.zeros((1, 3, CANVAS, CANVAS), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x, jnp.array([[CANVAS, CANVAS]], jnp.float32))
    # BatchNorm scales of 1 where the init has 0 (each bottleneck's last one), so
    # that every residual branch counts, as in a trained network; and a wider
    # classifier, so that the class scores (all ~1/C at init) spread apart and the
    # order of the detections does not hang on float rounding.
    variables = jax.tree_util.tree_map_with_path(
        lambda key, a: jnp.ones_like(a) if "scale" in jax.tree_util.keystr(key) and not a.any() else a, variables
    )
    params = dict(variables["params"])
    params["cls_score"] = {**params["cls_score"], "kernel": params["cls_score"]["kernel"] * 10.0}
    variables = {**variables, "params": params}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, CANVAS, CANVAS, 3), dtype=np.uint8)
    images[:, 40:90, 30:100] = (220, 40, 40)  # a flat block gives the RPN edges to find
    sizes = np.array([[CANVAS, CANVAS - 16]], np.int32)  # 16 columns of padding
    ref = jax.jit(serving_function(model, variables, score_thresh=0.0))(images, sizes)
    return model, variables, images, sizes, jax.tree_util.tree_map(np.asarray, ref)


def test_scatter_free_nms_gives_the_same_detections(detector):
    model, variables, images, sizes, ref = detector
    free = serving_function(model, variables, score_thresh=0.0, nms_scatter_free=True)
    out = jax.jit(free)(images, sizes)
    assert ref["valid"].sum() > 20
    # the switch is static: it changes the program that jit traces, not a value inside it
    scatters = lambda fn: str(jax.make_jaxpr(fn)(images, sizes)).count("scatter")  # noqa: E731
    assert scatters(free) < scatters(serving_function(model, variables, score_thresh=0.0))
    for k in OUTPUT_NAMES:
        np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=k)


@needs_onnx
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")  # jax2onnx's own jnp.clip
def test_onnxruntime_matches_jax(detector, tmp_path):
    import onnxruntime as ort

    model, variables, images, sizes, ref = detector
    path = export_onnx(model, variables, tmp_path / "mini.onnx", canvas=(CANVAS, CANVAS), score_thresh=0.0)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # jax2onnx leaves unused constants in loop bodies
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images", "image_sizes"]
    out = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), {"images": images, "image_sizes": sizes}), strict=True))

    valid = ref["valid"]
    assert valid.sum() > 20 and len(np.unique(ref["labels"][valid])) > 1  # real, varied detections
    np.testing.assert_array_equal(out["valid"], valid)
    np.testing.assert_array_equal(out["labels"], ref["labels"])
    np.testing.assert_allclose(out["boxes"], ref["boxes"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(out["scores"], ref["scores"], rtol=0, atol=1e-5)
    assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int32 and out["valid"].dtype == bool


@needs_onnx
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")
def test_cli_exports_a_trained_run_that_onnxruntime_runs_as_lucid_jax_predicts(tmp_path, capsys):
    """``lucid-jax export --format onnx``: the file and its JSON, run in onnxruntime on a canvas."""
    import json

    import onnxruntime as ort

    from lucid_jax import cli, jobs

    run = tmp_path / "run"
    train = ["train", "--data", "shapes", "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    train += ["--out", str(run)]
    assert cli.main([*train, "--shapes-train-examples", "16", "--num-workers", "0"]) == 0
    path = tmp_path / "detector.onnx"
    export = ["export", "--format", "onnx", "--checkpoint", str(run), "--score-thresh", "0"]
    assert cli.main([*export, "--out", str(path)]) == 0
    meta = json.loads(path.with_name("detector.onnx.json").read_text())
    assert meta["format"] == "onnx" and meta["canvas"] == [CANVAS, CANVAS] and meta["batch_size"] == 1
    assert meta["class_names"] == ["rectangle", "ellipse", "triangle"]

    model, variables, _, _ = jobs.load_trained(run)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, CANVAS, CANVAS, 3), dtype=np.uint8)
    sizes = np.array([[CANVAS - 32, CANVAS]], np.int32)
    ref = jax.tree_util.tree_map(
        np.asarray, jax.jit(serving_function(model, variables, score_thresh=0.0))(images, sizes)
    )
    assert ref["valid"].sum() > 10  # with no threshold, the barely trained detector keeps many boxes
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), {"images": images, "image_sizes": sizes}), strict=True))
    np.testing.assert_array_equal(out["valid"], ref["valid"])
    np.testing.assert_array_equal(out["labels"][ref["valid"]], ref["labels"][ref["valid"]])
    np.testing.assert_allclose(out["boxes"][ref["valid"]], ref["boxes"][ref["valid"]], rtol=0, atol=1e-3)
    # A folder in place of the output file is refused with a clear message and exit code 1.
    capsys.readouterr()
    assert cli.main([*export, "--out", str(tmp_path)]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err
