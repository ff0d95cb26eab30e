"""Shipping a trained detector: the jax.export artifact run by jax alone, and batched
prediction over folders and globs. The ``artifact`` and ``photos`` fixtures are in
tests/conftest.py, shared with test_serving.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lucid_jax import cli, jobs, serving
from lucid_jax.data import fit_to_canvas, preprocess
from lucid_jax.inference import make_predict_fn

# Runs in a virtual environment that holds jax and flatbuffers alone (serving_python).
RUNNER = r"""
import sys
import jax
import numpy as np

exp = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
images, sizes = np.load(sys.argv[2]), np.load(sys.argv[3])
out = exp.call(images, sizes)
np.savez(sys.argv[4], **{k: np.asarray(v) for k, v in out.items()})
print("lucid_jax imported:", any(m == "lucid_jax" or m.startswith("lucid_jax.") for m in sys.modules))
"""


_BARE = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this checkout on the path
SERVING_PACKAGES = ("jax", "flatbuffers")  # what the README says serving needs: pip install jax flatbuffers


def _requirements(name: str, seen: set) -> set:
    """``name`` and every distribution it requires (without extras), installed here, by name."""
    from importlib import metadata

    from packaging.requirements import Requirement

    key = name.lower().replace("_", "-")
    if key in seen:
        return seen
    seen.add(key)
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _requirements(req.name, seen)
    return seen


@pytest.fixture(scope="module")
def serving_python(tmp_path_factory):
    """The interpreter of a virtual environment with only jax, flatbuffers and what they require.

    The installed distributions are linked in (file by file, from each one's RECORD), so the
    environment is built offline in a second; lucid_jax, flax, orbax and the rest are absent.
    """
    import venv
    from importlib import metadata

    root = tmp_path_factory.mktemp("serving_venv")
    venv.EnvBuilder(with_pip=False).create(root)
    site = next((root / "lib").glob("python*/site-packages"))
    names = set()
    for package in SERVING_PACKAGES:
        names |= _requirements(package, set())
    for name in sorted(names):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            source = Path(dist.locate_file(file)).resolve()
            target = site / file
            if ".." in file.parts or not source.is_file() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    python = root / "bin" / "python"
    check = (
        "import importlib.metadata as m, importlib.util as u; "
        "print(sorted(d.name.lower().replace('_', '-') for d in m.distributions()), "
        "u.find_spec('lucid_jax'), u.find_spec('flax'))"
    )
    found = subprocess.run(
        [python, "-c", check], capture_output=True, text=True, check=True, cwd=root, env=_BARE
    ).stdout
    assert found.strip() == f"{sorted(names)} None None", found
    return python


def _float_canvases(images, size):
    """The library's preprocessed float canvases [B, size, size, 3] of ``images``, by name."""
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int32)}
    return np.stack(
        [
            preprocess({"image": images[name], **empty}, canvas=size, longer_side=size, size_divisibility=32)["image"]
            for name in sorted(images)
        ]
    )


def test_artifact_runs_with_jax_alone_and_equals_predict(trained, artifact, photos, tmp_path, serving_python):
    meta = json.loads((artifact.parent / "detector.jax.json").read_text())
    model, variables, class_names, config = jobs.load_trained(trained)
    assert meta["class_names"] == class_names and meta["canvas"] == [128, 128] and meta["batch_size"] == "any"
    assert meta["platforms"] == ["cpu", "cuda", "tpu"] and meta["jax_version"] == jax.__version__
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406] and meta["score_thresh"] == 0.3
    assert meta["inputs"]["images"][:5] == ["any", 128, 128, 3, "uint8"] and set(meta["outputs"]) == {
        "boxes",
        "scores",
        "labels",
        "valid",
    }

    _, images = photos
    fitted = [fit_to_canvas(images[name], (128, 128)) for name in sorted(images)]
    canvases = np.stack([f[0] for f in fitted])
    sizes = np.stack([f[1] for f in fitted])
    np.save(tmp_path / "images.npy", canvases)
    np.save(tmp_path / "sizes.npy", sizes)
    proc = subprocess.run(
        [
            serving_python,
            "-c",
            RUNNER,
            str(artifact),
            str(tmp_path / "images.npy"),
            str(tmp_path / "sizes.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_BARE,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lucid_jax imported: False" in proc.stdout
    got = dict(np.load(tmp_path / "out.npz"))

    # the library's predict on the preprocessed float canvas of the same images
    x = _float_canvases(images, 128)
    np.testing.assert_array_equal(
        np.stack([f[2] for f in fitted]),
        [
            preprocess(
                {"image": images[n], "boxes": np.zeros((0, 4)), "labels": np.zeros(0)},
                canvas=128,
                longer_side=128,
                size_divisibility=32,
            )["scale"]
            for n in sorted(images)
        ],
    )
    predict = make_predict_fn(model, score_thresh=0.3, channels_last=True)
    want = jax.device_get(predict(variables, x, sizes.astype(np.float32)))
    assert got["valid"].sum() >= 6, "the trained detector should find objects in most images"
    np.testing.assert_array_equal(got["valid"], want["valid"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)


def test_fixed_batch_export_and_bad_arguments(trained, tmp_path):
    path = tmp_path / "b2.jax"
    assert (
        cli.main(
            ["export", "--checkpoint", str(trained), "--out", str(path), "--batch-size", "2", "--platforms", "cpu"]
        )
        == 0
    )
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    assert exported.in_avals[0].shape == (2, 128, 128, 3) and exported.platforms == ("cpu",)
    assert json.loads((tmp_path / "b2.jax.json").read_text())["batch_size"] == 2
    with pytest.raises(ValueError, match="exported for batch size 2, not 4"):
        serving.load(path, batch_size=4)
    for args, message in [
        (["--platforms", "cpu,gpu"], "--platforms must be among cpu, cuda, tpu, got cpu, gpu"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ]:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lucid_jax.cli",
                "export",
                "--checkpoint",
                str(trained),
                "--out",
                str(tmp_path / "x.jax"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr  # usage errors
        assert not (tmp_path / "x.jax").exists()


def _mini_v2(num_classes: int = 21, backbone_num_classes: int = 1000, norm_mode: str = "batch", **kwargs):
    """torchvision's v2 heads (FPN norms, two RPN convs, a conv box head with BN and one
    fully connected layer) on the mini backbone: the v2 export path at test cost."""
    from lucid_jax.models import TORCHVISION_FASTER_RCNN_V2, faster_rcnn_mini_fpn

    v2 = {k: TORCHVISION_FASTER_RCNN_V2[k] for k in ("fpn_norm_mode", "rpn_conv_depth", "box_head_fcs")}
    config = dict(v2, norm_mode=norm_mode, box_head_convs=(32, 32), box_head_norm_mode=norm_mode)
    return faster_rcnn_mini_fpn(num_classes, backbone_num_classes, **{**config, **kwargs})


def test_v2_heads_export_and_equal_predict(tmp_path, monkeypatch, photos):
    """A detector with torchvision's v2 heads trains, exports with ``lucid-jax export``, and
    the artifact's detections equal ``predict``'s (BatchNorm's stored statistics in both)."""
    from lucid_jax.models import registry

    monkeypatch.setitem(registry._REGISTRY, "faster_rcnn_mini_fpn_v2", _mini_v2)
    run, path = tmp_path / "run", tmp_path / "v2.jax"
    train = ["train", "--data", "shapes", "--model", "faster_rcnn_mini_fpn_v2", "--steps", "6", "--out", str(run)]
    small = ["--batch-size", "2", "--image-size", "64", "--shapes-train-examples", "8", "--eval-every", "0"]
    assert cli.main([*train, *small, "--no-progress", "--num-workers", "0", "--warmup-steps", "1"]) == 0
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(path), "--score-thresh", "0.01"]) == 0
    model, variables, _, _ = jobs.load_trained(run)
    assert "box_norms.1" in variables["batch_stats"] and "conv.1" in variables["params"]["rpn"]["head"]
    _, images = photos
    fitted = [fit_to_canvas(images[name], (64, 64)) for name in sorted(images)]
    canvases, sizes = np.stack([f[0] for f in fitted]), np.stack([f[1] for f in fitted])
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    got = jax.device_get(exported.call(canvases, sizes))
    x = _float_canvases(images, 64)
    want = jax.device_get(make_predict_fn(model, score_thresh=0.01, channels_last=True)(variables, x, sizes))
    assert want["valid"].sum() >= 6
    np.testing.assert_array_equal(got["valid"], want["valid"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
