"""One run per folder: an exclusive OS lock on ``OUT/.lock`` for as long as ``train`` runs.

The lock is ``flock`` on a file descriptor, so the kernel releases it when the
process ends, however it ends: a killed run never leaves a stale lock, and the
file itself (which holds the owner's pid, for the message) may stay. Under
``jax.distributed`` only process 0 takes it.

Network and FUSE file systems (NFS, gcsfuse, SMB) do not lock reliably across
hosts, or at all: there the run warns once and goes on unlocked.
"""

import errno
import fcntl
import os
from pathlib import Path

from lucid_jax.jobs.config import JobError

LOCK_NAME = ".lock"
# File systems whose locks do not hold across hosts (or do not exist): warn, do not lock.
UNRELIABLE = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.gcsfuse", "fuse.sshfs", "fuse.s3fs", "fuse")
_UNLOCKED = "it is not locked, so start no other run with --out {out}"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def filesystem_type(path: Path) -> str | None:
    """The type of the file system that holds ``path`` (Linux's ``/proc/self/mounts``), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


class RunLock:
    """The exclusive use of a run folder; :meth:`release` (or the process's end) frees it.

    Args:
      out: the run folder (it exists).
      echo: prints the warning where the folder cannot be locked.

    Raises:
      JobError: another live process holds the folder, naming its pid.
    """

    def __init__(self, out: Path, echo=print):
        self.path = Path(out) / LOCK_NAME
        self._fd: int | None = None
        kind = filesystem_type(Path(out))
        if kind in UNRELIABLE:
            echo(f"warning: {out} is on {kind}, where file locks are not reliable; {_UNLOCKED.format(out=out)}")
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JobError(f"{out} is in use by another run (pid {owner}); wait for it or use another --out") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            echo(f"warning: {out} cannot be locked ({os.strerror(e.errno)}); {_UNLOCKED.format(out=out)}")
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the folder (closing the descriptor drops the lock); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
