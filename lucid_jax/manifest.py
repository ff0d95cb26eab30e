"""The seal of a checkpoint step: a manifest of the size and sha256 of every file.

Orbax does not checksum tensor files, so after orbax has committed a step,
:func:`write_manifest` adds ``lucid_manifest.json`` to the step directory, and
:func:`verify_checkpoint` checks every file against it before anything is read.
The manifest also records the checkpoint format version, so an older lucid_jax
refuses a newer checkpoint instead of misreading it.
"""

import hashlib
import json

from etils import epath

MANIFEST_NAME = "lucid_manifest.json"
FORMAT_VERSION = 1
_LIST_LIMIT = 3  # problems named, so an error stays one line


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsealed or does not fit the model."""


def check_format(found, where) -> None:
    """Refuse a checkpoint written in a newer format than this code reads.

    Args:
      found: the ``format`` recorded in the checkpoint (absent in none we wrote).
      where: the checkpoint directory, for the message.
    """
    if found is not None and found > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format version {found}, newer than version {FORMAT_VERSION} "
            "that this lucid_jax reads; upgrade lucid_jax to restore it"
        )


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Relative posix name -> path of every file in a step directory but the manifest."""
    found, pending = {}, [step_dir]
    while pending:  # epath has no recursive glob (it would be slow on GCS)
        for path in pending.pop().iterdir():
            rel = path.relative_to(step_dir).as_posix()
            if path.is_dir():
                pending.append(path)
            elif rel != MANIFEST_NAME:
                found[rel] = path
    return found


def write_manifest(step_dir) -> None:
    """Seal a committed step: write size and sha256 of each of its files."""
    step_dir = epath.Path(step_dir)
    files = {rel: {"size": p.stat().length, "sha256": _sha256(p)} for rel, p in sorted(_files(step_dir).items())}
    tmp = step_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, "files": files}, indent=1))
    tmp.rename(step_dir / MANIFEST_NAME)  # atomic on POSIX: a manifest is whole or absent


def verify_checkpoint(step_dir) -> None:
    """Check every file of a step directory against its manifest.

    Raises:
      CheckpointError: naming the directory and the first problems found (no
        manifest, a missing, truncated or modified file).
    """
    step_dir = epath.Path(step_dir)
    manifest_path = step_dir / MANIFEST_NAME
    if not manifest_path.exists():
        raise CheckpointError(
            f"checkpoint {step_dir} has no {MANIFEST_NAME}: the save was interrupted before it was "
            "sealed, or the manifest was deleted; this checkpoint cannot be trusted"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: {MANIFEST_NAME} is unreadable ({e})") from e
    check_format(manifest.get("format"), step_dir)
    present = _files(step_dir)
    problems = []
    for rel, want in expected.items():
        if rel not in present:
            problems.append(f"{rel} is missing")
            continue
        size = present[rel].stat().length
        if size != want["size"]:
            problems.append(f"{rel} has {size} bytes, expected {want['size']} (truncated or overwritten)")
        elif _sha256(present[rel]) != want["sha256"]:
            problems.append(f"{rel} is corrupted (sha256 mismatch)")
    if problems:
        more = f" (and {len(problems) - _LIST_LIMIT} more)" if len(problems) > _LIST_LIMIT else ""
        raise CheckpointError(f"checkpoint {step_dir} is corrupt: " + "; ".join(problems[:_LIST_LIMIT]) + more)
