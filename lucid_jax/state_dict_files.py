"""State dicts on disk: ``.lcd``, ``.safetensors``, ``.npz`` and ``.pth``, read and written
as flat ``{name: np.ndarray}`` dicts. Nothing here knows a model; ``state_dict`` maps
such dicts onto flax variables.

Lucid's own ``.lcd`` files are read without running anything from them.

``lucid.save(module_or_state_dict, "x.lcd")`` (lucid-dl 2.8.x) pickles

    {"type": "OrderedDict" | "dict", "format_version": 1.1, "content": state_dict}

where the state dict maps names to NumPy arrays. A pickle can call any importable
function while it loads, so ``read_lcd`` uses an unpickler that resolves only the
globals such a file needs and refuses every other one before it can be called:

    collections.OrderedDict
    numpy.ndarray, numpy.dtype
    numpy._core.multiarray._reconstruct   (protocols 2 to 4)
    numpy._core.numeric._frombuffer       (protocol 5, Python 3.14's default)
    numpy._core.multiarray.scalar         (NumPy scalars)
    _codecs.encode, latin-1 only          (protocol 2's bytes)

``numpy.core.*`` (files written under NumPy 1.x) is read as ``numpy._core.*``, as
NumPy's own unpickler does. Object arrays are refused: their elements would be
arbitrary pickled objects. ``write_lcd`` writes protocol 4, which NumPy 1.26 and
2.x both read.
"""

import collections
import importlib
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from lucid_jax.files import atomic_path


class StateDictError(ValueError):
    """A state dict cannot be read, or does not fit the model; the message names the file or every offending key."""


LCD_FORMAT_VERSION = 1.1
LCD_TYPES = ("OrderedDict", "dict")
_PROTOCOL = 4


class LcdError(StateDictError):
    """An ``.lcd`` file is malformed or asks for something a state dict never needs."""


def _numpy_core(submodule: str):
    """``numpy._core.<submodule>`` (NumPy >= 1.26 has the name; 1.x files say numpy.core)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # pragma: no cover - NumPy without the _core alias
        return importlib.import_module(f"numpy.core.{submodule}")


def _checked_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise LcdError(f"refused an object dtype ({dtype}): a state dict holds numeric arrays only")
    return dtype


def _latin1_encode(text, encoding="latin1"):
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise LcdError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    return {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _checked_dtype,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        ("_codecs", "encode"): _latin1_encode,
    }


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves the allowlisted globals and refuses every other one by name."""

    def __init__(self, file):
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        canonical = "numpy._core" + module[len("numpy.core") :] if module.startswith("numpy.core") else module
        try:
            return self._allowed[(canonical, name)]
        except KeyError:
            raise LcdError(f"refused global {module}.{name}: a Lucid state dict never needs it") from None

    def persistent_load(self, pid):
        raise LcdError(f"refused persistent id {pid!r}")


def _check_arrays(content: Mapping, path: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in content.items():
        if not isinstance(key, str):
            raise LcdError(f"{path}: key {key!r} is not a string")
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise LcdError(f"{path}: {key} is a {type(value).__name__}, not an array")
        if value.dtype.hasobject:
            raise LcdError(f"{path}: {key} is an object array; refused")
        out[key] = value
    return out


def read_lcd(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a Lucid ``.lcd`` state dict.

    Args:
      path: a file written by ``lucid.save`` (or ``write_lcd``).

    Returns:
      ``{name: np.ndarray}`` in the file's order.

    Raises:
      LcdError: the file is not a pickled Lucid state dict, or it references a
        global outside the allowlist (named in the message; nothing from the
        file has run), or it holds object arrays.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            data = _StateDictUnpickler(f).load()
        except LcdError as e:
            raise LcdError(f"{path}: {e}") from None
        except Exception as e:  # truncated or not a pickle at all
            raise LcdError(f"{path} is not a readable .lcd file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "content" not in data:
        raise LcdError(f"{path} is not a Lucid .lcd file (expected a dict with type, format_version, content)")
    if data.get("type") not in LCD_TYPES or not isinstance(data["content"], Mapping):
        raise LcdError(f"{path} holds a Lucid {data.get('type')!r}, not a state dict")
    return _check_arrays(data["content"], path)


def write_lcd(flat: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``{name: array}`` as Lucid's ``.lcd``, readable by ``lucid.load`` (2.8.x)."""
    content = collections.OrderedDict((k, np.ascontiguousarray(np.asarray(v))) for k, v in flat.items())
    _check_arrays(content, os.fspath(path))
    data = {"type": "OrderedDict", "format_version": LCD_FORMAT_VERSION, "content": content}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=_PROTOCOL)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a flat state dict from ``.lcd``, ``.safetensors``, ``.npz`` or ``.pth``/``.pt``.

    ``.lcd`` (Lucid's own format) is read by a restricted unpickler
    (:func:`read_lcd`); ``.pth`` with ``torch.load(weights_only=True)``, which
    refuses arbitrary pickled objects; ``.npz`` with ``allow_pickle=False``. A
    ``.pth`` holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.

    Raises:
      FileNotFoundError: no such file.
      StateDictError: an unknown extension, a file that is not a state dict, a
        refused pickle, or ``.pth`` without torch installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state dict file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".lcd":
        return read_lcd(path)
    if ext == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise StateDictError(f"{path} is not a readable .safetensors file ({e})") from None
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise StateDictError(f"{path} is not a readable .npz state dict ({e})") from None
    if ext in (".pth", ".pt", ".bin"):
        return _load_torch_file(path)
    raise StateDictError(f"unknown state dict format {ext!r} for {path}; use .lcd, .safetensors, .npz or .pth")


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise StateDictError(
            f"reading {path} needs torch (pip install torch), or convert it to .safetensors first: "
            "safetensors.torch.save_file(torch.load(PATH, weights_only=True), 'weights.safetensors')"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code with an UnpicklingError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateDictError(f"{path}: torch.load(weights_only=True) refused or failed to read it: {first}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(hasattr(v, "detach") for v in obj.values()):
        raise StateDictError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {
        k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
        for k, v in obj.items()
    }


def save_state_dict_file(flat: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a flat state dict as ``.lcd`` (Lucid's format), ``.safetensors`` or ``.npz`` (by extension)."""
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    ext = os.path.splitext(path)[1].lower()
    if ext == ".lcd":
        write_lcd(arrays, path)
    elif ext == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, path)
    elif ext == ".npz":
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    else:
        raise StateDictError(f"unknown state dict format {ext!r} for {path}; use .lcd, .safetensors or .npz")
