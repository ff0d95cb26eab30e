"""The Colab notebooks run top to bottom and show what they promise.

Each notebook is executed for real with nbclient, on a fresh ``python3`` kernel, in a
scratch directory (the files it writes stay out of the repository), with
``LUCID_JAX_NOTEBOOK_SMALL=1``: the mini detector and a few steps, about a minute or
two per notebook on a 2-core CPU. The assertions read the cells' real outputs.
"""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

REASON = "{} is not installed; pip install -e '.[test]' to run the notebook tests"
nbformat = pytest.importorskip("nbformat", reason=REASON.format("nbformat"))
nbclient = pytest.importorskip("nbclient", reason=REASON.format("nbclient"))
pytest.importorskip("ipykernel", reason=REASON.format("ipykernel"))

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 600
FLOAT = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf)"
LOSS_LINE = re.compile(
    rf"step\s+(\d+)\s+total_loss {FLOAT}\s+rpn_cls {FLOAT}\s+rpn_reg {FLOAT}\s+roi_cls {FLOAT}\s+roi_reg {FLOAT}"
)


def execute(name: str, cwd: Path):
    """Run notebook ``name`` top to bottom in ``cwd``; return it with its outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = dict(os.environ)
    env["LUCID_JAX_NOTEBOOK_SMALL"] = "1"
    # This checkout is importable even where it is not pip-installed, so the
    # notebook's install cell has nothing to do.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # On a GPU machine the kernel shares the device with this process.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return nb


def cell_text(cell) -> str:
    """Everything a code cell printed (stdout, stderr and text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def all_text(nb) -> str:
    return "\n".join(cell_text(c) for c in code_cells(nb))


def cell_with(nb, snippet: str):
    """The one code cell whose source contains ``snippet``."""
    cells = [c for c in code_cells(nb) if snippet in c.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {snippet!r}"
    return cells[0]


def loss_lines(text: str) -> list[tuple[int, list[float]]]:
    """(step, [total, rpn_cls, rpn_reg, roi_cls, roi_reg]) for every logged train step."""
    return [(int(m[1]), [float(v) for v in m.groups()[1:]]) for m in LOSS_LINE.finditer(text)]


def assert_install_cell_is_a_no_op(nb):
    text = cell_text(cell_with(nb, "importlib.util.find_spec"))
    assert re.fullmatch(r"lucid_jax \S+ is importable\n", text), text


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    return execute("quickstart.ipynb", cwd), cwd


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("backbone_pretraining")
    return execute("backbone_pretraining.ipynb", cwd), cwd


# --- quickstart.ipynb -------------------------------------------------------------


def test_quickstart_seed_example(quickstart):
    nb, _ = quickstart
    assert_install_cell_is_a_no_op(nb)
    assert "SMALL=True: faster_rcnn_mini_fpn" in all_text(nb)
    lines = cell_text(cell_with(nb, "faster_rcnn_resnet_101_fpn(num_classes=21)")).splitlines()
    assert lines[:2] == ["(1, 300, 21)", "(1, 300, 4)"], lines
    assert "Total Parameters: 62,498,494" in lines


def test_quickstart_trains_with_finite_losses(quickstart):
    nb, _ = quickstart
    logged = loss_lines(cell_text(cell_with(nb, "train_step(state, shard_batch(")))
    assert [step for step, _ in logged][:2] == [1, 10] and len(logged) >= 5, logged
    assert all(math.isfinite(v) for _, losses in logged for v in losses), logged
    # The RPN learns within a few dozen steps: its objectness loss falls from ~ln 2.
    assert logged[-1][1][1] < 0.5 * logged[0][1][1], logged


def test_quickstart_evaluates_held_out_images(quickstart):
    nb, _ = quickstart
    text = cell_text(cell_with(nb, "DetectionEvaluator(test_set.class_names)"))
    assert "16 held-out images" in text
    m = re.search(rf"^AP {FLOAT}  AP50 {FLOAT}  AP75 {FLOAT}$", text, re.M)
    assert m, text
    ap, ap50, ap75 = (float(v) for v in m.groups())
    assert 0.0 <= ap75 <= ap50 <= 1.0 and 0.0 <= ap <= ap50, text
    assert ap50 > 0.05, f"the trained detector finds next to nothing on held-out shapes: {text}"
    for name in ("rectangle", "ellipse", "triangle"):
        assert re.search(rf"^  {name}\s+AP {FLOAT}$", text, re.M), text


def test_quickstart_draws_detections(quickstart):
    from PIL import Image

    nb, cwd = quickstart
    cell = cell_with(nb, "save_detections_grid(")
    assert re.search(r"wrote quickstart_detections.png: \d+ detections with score >= 0.3 on 4 images", cell_text(cell))
    png = cwd / "quickstart_detections.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (4 * 128, 128)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # real images, not a blank canvas
    shown = [out for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(shown) == 1, "the PNG is displayed in the notebook"


# --- backbone_pretraining.ipynb ---------------------------------------------------


def test_pretraining_classifier_learns(pretraining):
    nb, _ = pretraining
    assert_install_cell_is_a_no_op(nb)
    assert "backbone logits: (2, 3)" in all_text(nb)
    text = cell_text(cell_with(nb, "def classifier_step("))
    logged = [(float(m[1]), float(m[2])) for m in re.finditer(rf"loss {FLOAT}  accuracy {FLOAT}", text)]
    assert len(logged) >= 5, text
    assert logged[-1][0] < logged[0][0] and logged[-1][1] > logged[0][1], logged
    accuracy = float(re.search(rf"held-out accuracy: {FLOAT}", all_text(nb))[1])
    assert accuracy > 0.4, accuracy  # chance is 1/3


def test_pretraining_saves_and_reloads_the_backbone(pretraining):
    from lucid_jax.state_dict_files import load_state_dict_file

    nb, cwd = pretraining
    text = all_text(nb)
    assert re.search(r"fc\.weight\s+\(3, \d+\)", text), text
    assert re.search(r"loaded backbone equals the trained one: all \d+ arrays identical", text), text
    assert "RPN and RoI heads keep their fresh initialisation: True" in text
    flat = load_state_dict_file(cwd / "backbone_pretrained.safetensors")
    assert flat["fc.weight"].shape[0] == 3 and flat["stem.0.weight"].shape[1:] == (3, 7, 7)
    assert all(np.isfinite(v).all() for v in flat.values())


def test_pretraining_shows_the_backbone_num_classes_error(pretraining):
    nb, _ = pretraining
    text = cell_text(cell_with(nb, "except state_dict.StateDictError as err:"))
    assert text.startswith("StateDictError: "), text
    assert re.search(r"^  fc\.weight: state dict has shape \(3, (\d+)\), model expects \(1000, \1\)", text, re.M), text
    assert re.search(r"^  fc\.bias: state dict has shape \(3,\), model expects \(1000,\)", text, re.M), text


def test_pretraining_fine_tunes_with_a_lower_backbone_lr(pretraining):
    nb, _ = pretraining
    text = cell_text(cell_with(nb, "backbone_lr_mult=0.1"))
    logged = loss_lines(text)
    assert len(logged) >= 2 and logged[-1][0] == 30, logged
    assert all(math.isfinite(v) for v in logged[-1][1]), logged[-1]
    assert "final losses finite: True" in text
    ratio = float(re.search(rf"ratio {FLOAT}", all_text(nb))[1])
    assert 0.0 < ratio < 0.5, ratio  # the backbone moves much less than the heads


# --- the committed notebooks --------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart.ipynb", "backbone_pretraining.ipynb"])
def test_committed_notebooks_hold_a_clean_run(name):
    """The notebooks are committed executed, in order, without errors (cheap: nothing runs)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert "SMALL=True" in all_text(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
