"""State-dict files: .safetensors, .npz and torch .pth (read with weights_only=True),
and Lucid's .lcd files: the format lucid.save writes, a restricted unpickler that runs
nothing from the file, and round trips through the detector's state dict."""

import collections
import os
import pickle

import jax
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.state_dict_files import StateDictError, load_state_dict_file, read_lcd, save_state_dict_file, write_lcd
from tests.models.conftest import TV_REASON, random_images, tiny_detector


@pytest.fixture(scope="module")
def float32_flat():
    rng = np.random.default_rng(0)
    return {
        "stem.0.weight": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
        "fc.bias": np.arange(5, dtype=np.float32),
    }


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_save_load_round_trip(float32_flat, tmp_path, ext):
    path = tmp_path / f"w{ext}"
    save_state_dict_file(float32_flat, path)
    back = load_state_dict_file(path)
    assert set(back) == set(float32_flat)
    for k in float32_flat:
        np.testing.assert_array_equal(back[k], float32_flat[k])


def test_pth_is_read_without_unpickling_objects(float32_flat, tmp_path):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    path = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in float32_flat.items()}, path)
    back = load_state_dict_file(path)
    np.testing.assert_array_equal(back["stem.0.weight"], float32_flat["stem.0.weight"])

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"stem.0.weight": Payload()}, f)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state_dict_file(evil)


def test_unknown_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_state_dict_file(tmp_path / "none.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.safetensors, \.npz or \.pth"):
        load_state_dict_file(tmp_path / "w.txt")


# --- Lucid's .lcd files ---------------------------------------------------------------


def _lucid_file(path, content, protocol=4, type_name="OrderedDict"):
    """What lucid.save (lucid-dl 2.8.x) writes for a state dict."""
    with open(path, "wb") as f:
        pickle.dump({"type": type_name, "format_version": 1.1, "content": content}, f, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def flat():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        [
            ("stem.0.weight", rng.standard_normal((4, 3, 7, 7)).astype(np.float32)),
            ("stem.1.running_mean", rng.standard_normal(4).astype(np.float32)),
            ("stem.1.num_batches_tracked", np.array(7, np.int64)),
            ("fc.bias", np.arange(5, dtype=np.float64)),
        ]
    )


def test_write_lcd_is_lucids_format_in_protocol_4(flat, tmp_path):
    path = tmp_path / "w.lcd"
    write_lcd(flat, path)
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x04"  # protocol 4: NumPy 1.26 and 2.x both read it
    data = pickle.loads(raw)  # what lucid.load does
    assert data["type"] == "OrderedDict" and data["format_version"] == 1.1
    assert isinstance(data["content"], collections.OrderedDict)
    assert list(data["content"]) == list(flat)
    for k, v in flat.items():
        assert type(data["content"][k]) is np.ndarray and data["content"][k].dtype == v.dtype
        np.testing.assert_array_equal(data["content"][k], v)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("type_name", ["OrderedDict", "dict"])
def test_read_lcd_of_every_protocol(flat, tmp_path, protocol, type_name):
    content = flat if type_name == "OrderedDict" else dict(flat)
    back = read_lcd(_lucid_file(tmp_path / "w.lcd", content, protocol, type_name))
    assert list(back) == list(flat)
    for k, v in flat.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_numpy_1_names_are_read_as_numpy_core(flat, tmp_path):
    raw = pickle.dumps({"type": "OrderedDict", "format_version": 1.1, "content": flat}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as NumPy 1.x writes it
    (tmp_path / "old.lcd").write_bytes(old)
    back = read_lcd(tmp_path / "old.lcd")
    np.testing.assert_array_equal(back["stem.0.weight"], flat["stem.0.weight"])


def test_numpy_scalars_become_arrays(tmp_path):
    back = read_lcd(_lucid_file(tmp_path / "s.lcd", {"a": np.float32(2.5)}))
    assert back["a"].shape == () and back["a"].dtype == np.float32 and back["a"] == 2.5


class _Trap:
    """Creates a marker file if the unpickler ever calls what it pickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_booby_trapped_lcd_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = _lucid_file(tmp_path / "evil.lcd", {"stem.0.weight": _Trap(marker)})
    with pytest.raises(StateDictError, match=r"refused global (posix|os|nt)\.system"):
        read_lcd(path)
    assert not marker.exists()
    # the same file really is armed: plain pickle runs it
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        (eval, ("1+1",)),
        (getattr, ("abc", "upper")),
        (collections.namedtuple, ("T", "a b")),
    ],
)
def test_any_other_global_is_refused_by_name(tmp_path, payload):
    class Reduce:
        def __reduce__(self):
            return payload

    path = _lucid_file(tmp_path / "evil.lcd", {"x": Reduce()})
    with pytest.raises(StateDictError, match=f"refused global .*{payload[0].__name__}"):
        read_lcd(path)


def test_object_arrays_are_refused(tmp_path):
    path = _lucid_file(tmp_path / "obj.lcd", {"a": np.array([1, "x"], dtype=object)})
    with pytest.raises(StateDictError, match="object"):
        read_lcd(path)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a pickle at all", "not a readable .lcd"),
        (pickle.dumps([1, 2, 3]), "not a Lucid .lcd file"),
        (pickle.dumps({"type": "Tensor", "format_version": 1.1, "content": np.zeros(3)}), "Tensor"),
        (pickle.dumps({"type": "dict", "format_version": 1.1, "content": {"a": [1, 2]}}), "a is a list"),
    ],
)
def test_malformed_files_raise_one_line(tmp_path, content, match):
    (tmp_path / "bad.lcd").write_bytes(content)
    with pytest.raises(StateDictError, match=match) as err:
        load_state_dict_file(tmp_path / "bad.lcd")
    assert "\n" not in str(err.value)


def test_truncated_lcd_raises(flat, tmp_path):
    write_lcd(flat, tmp_path / "w.lcd")
    raw = (tmp_path / "w.lcd").read_bytes()
    (tmp_path / "cut.lcd").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StateDictError, match="not a readable .lcd"):
        read_lcd(tmp_path / "cut.lcd")


def test_detector_round_trips_through_lcd(tmp_path):
    model = tiny_detector()
    variables = jax.jit(model.init)(jax.random.key(3), random_images(0, size=64))
    flat = state_dict.to_state_dict(variables, model=model)
    save_state_dict_file(flat, tmp_path / "detector.lcd")
    back = load_state_dict_file(tmp_path / "detector.lcd")
    assert list(back) == list(flat)  # Lucid's names, its stem copy and buffers included
    zeros = jax.tree_util.tree_map(np.zeros_like, variables)
    loaded = state_dict.from_state_dict(zeros, back, strict=True, model=model)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), loaded, variables)
    assert all(jax.tree_util.tree_leaves(same))
