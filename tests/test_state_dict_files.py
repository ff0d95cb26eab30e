"""State-dict files: .safetensors, .npz and torch .pth (read with weights_only=True),
and importing a torchvision ResNet checkpoint file into ``backbone.net``."""

import pickle

import jax
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models import resnet_50
from tests.models.conftest import TV_REASON


@pytest.fixture(scope="module")
def flat():
    rng = np.random.default_rng(0)
    return {
        "stem.0.weight": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
        "fc.bias": np.arange(5, dtype=np.float32),
    }


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_save_load_round_trip(flat, tmp_path, ext):
    path = tmp_path / f"w{ext}"
    state_dict.save_state_dict_file(flat, path)
    back = state_dict.load_state_dict_file(path)
    assert set(back) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])


def test_pth_is_read_without_unpickling_objects(flat, tmp_path):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    path = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in flat.items()}, path)
    back = state_dict.load_state_dict_file(path)
    np.testing.assert_array_equal(back["stem.0.weight"], flat["stem.0.weight"])

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"stem.0.weight": Payload()}, f)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        state_dict.load_state_dict_file(evil)


def test_unknown_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        state_dict.load_state_dict_file(tmp_path / "none.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.safetensors, \.npz or \.pth"):
        state_dict.load_state_dict_file(tmp_path / "w.txt")


def test_torchvision_resnet50_file_imports_into_our_resnet(tmp_path):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = tv(torch.from_numpy(x)).numpy()
    model = resnet_50()
    template = jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(model.init, jax.random.key(0), x)
    )
    flat = state_dict.from_torchvision_resnet(state_dict.load_state_dict_file(path))
    variables = state_dict.from_state_dict(template, flat, strict=True)
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.apply)(variables, x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    # and the same weights through .npz
    state_dict.save_state_dict_file(flat, tmp_path / "r50.npz")
    again = state_dict.from_state_dict(template, state_dict.load_state_dict_file(tmp_path / "r50.npz"))
    np.testing.assert_array_equal(
        np.asarray(again["params"]["layer3"]["5"]["conv2"]["conv"]["kernel"]),
        np.asarray(variables["params"]["layer3"]["5"]["conv2"]["conv"]["kernel"]),
    )
