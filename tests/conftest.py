"""Fixtures shared across test files: the tiny detector's initial variables, one mini
detector trained through the CLI, its exported artifact and a folder of photos.

The processes the tests start (the command line, notebooks' kernels) share one
persistent compilation cache, so the mini detector's step compiles once for all of
them. This process has imported jax already and keeps its own configuration: the
tests that count compiles see every compile.
"""

import os
import shutil
import tempfile

import jax
import pytest
from PIL import Image

from lucid_jax import cli
from lucid_jax.compile_count import count_compiles
from lucid_jax.data import ShapesDataset
from tests.models.conftest import random_images, tiny_detector
from tests.voc_fixture import write_voc

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # the caller's own cache
    config._lucid_jax_cache = tempfile.mkdtemp(prefix="lucid_jax-tests-compilation-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config._lucid_jax_cache
    for name, value in _CACHE_ENV.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    cache = getattr(config, "_lucid_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


SMALL = ["--batch-size", "8", "--image-size", "128", "--no-progress", "--num-workers", "2"]


@pytest.fixture(scope="session")
def voc(tmp_path_factory):
    """A VOC folder of PNGs and XML: train/val split, both orientations, crowded images, difficult objects."""
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc(root)


@pytest.fixture(scope="session")
def voc_mixed(tmp_path_factory):
    """A small VOC folder whose images span three canvases of ``--image-size 64:128``: landscape
    96x160 and portrait 160x96 (5:3, beyond the square band of 5:4) and square crowded 160x160."""
    root = tmp_path_factory.mktemp("voc_mixed")
    return root, write_voc(root, train=30, val=12, landscape=(96, 160))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, voc):
    """A mini detector trained through the CLI on the VOC folder's train split (128x128 canvas),
    validated on its val split at steps 150 and 300; (the run's folder, the names of the
    functions XLA compiled during the run, in order)."""
    out = tmp_path_factory.mktemp("run")
    with count_compiles() as compiles:
        code = cli.main(
            [
                "train",
                "--data",
                f"voc:{voc[0]}",
                "--steps",
                "300",
                "--out",
                str(out),
                "--checkpoint-every",
                "150",
                "--eval-every",
                "150",
                *SMALL,
            ]
        )
    assert code == 0
    return out, list(compiles.names)


@pytest.fixture(scope="session")
def trained(trained_run):
    """The folder of ``trained_run``."""
    return trained_run[0]


@pytest.fixture(scope="session")
def tiny():
    """(model, variables) of the tiny detector, initialised at 128x128: compiled once for every file."""
    model = tiny_detector()
    variables = jax.jit(model.init)(jax.random.key(0), random_images(0))
    return model, variables


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Six PNGs of shapes at three sizes (landscape, portrait, square), named 1.png .. 6.png."""
    folder = tmp_path_factory.mktemp("photos")
    images = {}
    for i, size in enumerate([(96, 160), (160, 96), (128, 128), (64, 200), (200, 64), (100, 100)]):
        image = ShapesDataset(num_examples=1, seed=20 + i, image_size=size)[0]["image"]
        Image.fromarray(image).save(folder / f"{i + 1}.png")
        images[f"{i + 1}.png"] = image
    return folder, images


@pytest.fixture(scope="session")
def artifact(trained, tmp_path_factory):
    """The trained run exported with a symbolic batch and a 0.3 threshold."""
    path = tmp_path_factory.mktemp("export") / "detector.jax"
    assert cli.main(["export", "--checkpoint", str(trained), "--out", str(path), "--score-thresh", "0.3"]) == 0
    return path
