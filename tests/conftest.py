"""Fixtures shared across test files: one mini detector trained through the CLI."""

import pytest

from lucid_jax import cli
from tests.voc_fixture import write_voc

SMALL = ["--batch-size", "8", "--image-size", "128", "--no-progress", "--num-workers", "2"]


@pytest.fixture(scope="session")
def voc(tmp_path_factory):
    """A VOC folder of PNGs and XML: train/val split, both orientations, crowded images, difficult objects."""
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc(root)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, voc):
    """A mini detector trained through the CLI on the VOC folder's train split (128x128 canvas)."""
    out = tmp_path_factory.mktemp("run")
    code = cli.main(
        ["train", "--data", f"voc:{voc[0]}", "--steps", "300", "--out", str(out), "--checkpoint-every", "150", *SMALL]
    )
    assert code == 0
    return out
