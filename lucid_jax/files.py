"""Files written whole or not at all, and file-system faults said in one line.

Every whole file a job writes (JSON results, exports, PNGs, reports) goes through
:func:`atomic_path`: it is written under a hidden temporary name in its own folder
and renamed onto its name only once complete, so a reader (or a rerun) never finds
half a file. When the write fails, the temporary file is removed.

A write that fails for lack of space, a read-only file system, a permission or a
quota raises :class:`StorageError`: an ``OSError`` whose text is one line naming the
path and the cause, e.g. ``runs/x/detections.json: no space left on device``.
:func:`fault_errno` finds the cause in an exception chain, including tensorstore's
errors (orbax's tensor files), which carry it as ``[os_error_code='28']``.
"""

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

# The faults of a file system that a user can fix (free space, mount read-write, fix
# permissions, raise a quota), each with the words the one-line error uses.
FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class StorageError(OSError):
    """A file-system fault while writing ``path``: one line, ``PATH: cause[ detail]``.

    Attributes:
      errno: the fault's errno (one of :data:`FAULTS`).
      path: the file or folder being written.
    """

    def __init__(self, code: int, path: str | os.PathLike, detail: str = ""):
        super().__init__(code, FAULTS.get(code, os.strerror(code)), os.fspath(path))
        self.path = os.fspath(path)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: {self.strerror}" + (f" {self.detail}" if self.detail else "")


def fault_errno(exc: BaseException | None) -> int | None:
    """The errno of a file-system fault (:data:`FAULTS`) in ``exc`` or its chain, else None.

    Reads ``OSError.errno``, and the ``os_error_code`` that tensorstore (orbax's
    array writer) puts in the text of its ``ValueError``.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        if code is None:
            match = _TENSORSTORE_ERRNO.search(str(exc))
            code = int(match.group(1)) if match else None
        if code in FAULTS:
            return code
        for inner in getattr(exc, "exceptions", ()):  # an ExceptionGroup of asyncio tasks
            code = fault_errno(inner)
            if code is not None:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def describe(exc: BaseException) -> str:
    """One line for an ``OSError`` the user can act on: ``PATH: cause`` where the path is known."""
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        cause = FAULTS.get(exc.errno or 0, exc.strerror[:1].lower() + exc.strerror[1:])
        return f"{exc.filename}: {cause}" if exc.filename else cause
    return str(exc)


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` for writing it, with the same suffix (for writers that read it)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` whole or not at all: yields a temporary path beside it to write.

    On leaving the block the temporary file is renamed onto ``path`` (atomic on
    POSIX within one folder). If the block raises, it is removed and ``path`` is
    left as it was; a file-system fault becomes a :class:`StorageError` naming ``path``.

    Example::

        with atomic_path("out/curves.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = fault_errno(e)
        if code is not None and not isinstance(e, StorageError):
            raise StorageError(code, path) from None
        raise


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
