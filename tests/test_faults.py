"""Faults injected into real runs through the command line: a full disk, a read-only
folder, a quota, SIGKILL at random moments, two runs into one folder, a corrupt newest
checkpoint. Each case checks the exact stderr line, the exit code, that nothing is left
half-written, and that the data that was there is intact.

The disk cases mount a tmpfs (CI runs as root); where mounting is refused they skip,
saying why. Every run here is the small detector on 8 synthetic 64x64 images with a
checkpoint at every step, and shares the session's persistent compilation cache.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lucid_jax.files import StorageError, atomic_path, describe, fault_errno
from lucid_jax.jobs import JobError, run_lock
from lucid_jax.manifest import verify_checkpoint
from tests.cli_run import run_cli

STEPS = 8
TRAIN = [
    "train",
    "--data",
    "shapes",
    "--model",
    "faster_rcnn_mini_fpn",
    "--batch-size",
    "2",
    "--image-size",
    "64",
    "--shapes-train-examples",
    "8",
    "--num-workers",
    "0",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "1",
    "--log-every",
    "1",
    "--no-progress",
]
LOSSES = ("total_loss", "rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss", "grad_norm")


def _start(out, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lucid_jax.cli", *TRAIN, "--out", str(out), *map(str, extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in LOSSES) for r in _records(out) if "total_loss" in r}


def _leftovers(folder) -> list[str]:
    """Temporary checkpoint folders and partial files anywhere under ``folder``."""
    return sorted(str(p) for p in Path(folder).rglob("*") if "orbax-checkpoint-tmp" in p.name or ".partial-" in p.name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of STEPS steps; a second run started into its folder while it
    runs. Returns (the folder, the second run's (exit code, stderr), the first's pid)."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    first = _start(out, "--steps", STEPS)
    deadline = time.time() + 300
    while not (out / ".lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = run_cli(*TRAIN, "--out", out, "--steps", STEPS)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    return out, second, first.pid


def test_two_runs_into_one_folder_the_second_refused_at_once(straight):
    out, (code, stdout, stderr), pid = straight
    assert code == 1 and stdout == ""
    assert stderr == (
        f"lucid-jax: error: {out} is in use by another run (pid {pid}); wait for it or use another --out\n"
    )
    # the first run is whole: every step logged once, every kept checkpoint sound
    assert [r["step"] for r in _records(out)] == list(range(1, STEPS + 1))
    for step in (STEPS - 1, STEPS):
        verify_checkpoint(out / "checkpoints" / str(step))
    assert _leftovers(out) == []


def test_sigkill_at_random_moments_then_resume_logs_what_an_uninterrupted_run_logs(straight, tmp_path):
    import jax
    import numpy as np

    from lucid_jax import jobs

    reference = _losses(straight[0])
    out = tmp_path / "killed"
    rng = random.Random(24)
    # one kill while the run starts, then four a random fraction of a second after a random
    # step is logged: inside a step, its checkpoint's write, or its seal
    after_steps = [None, *sorted(rng.sample(range(1, STEPS), 4))]
    killed_after = []
    for after in after_steps:
        proc = _start(out, "--steps", STEPS)
        deadline = time.time() + 300
        while after is not None and time.time() < deadline and proc.poll() is None:
            logged = _records(out) if (out / "log.jsonl").exists() else []
            if logged and logged[-1].get("step", 0) >= after:
                break
            time.sleep(0.05)
        pause = rng.uniform(2.0, 6.0) if after is None else rng.uniform(0.0, 1.0)
        time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        steps = [r["step"] for r in _records(out) if "total_loss" in r] if (out / "log.jsonl").exists() else []
        assert steps == sorted(set(steps)), f"a step logged twice after the kill {pause:.2f} s after step {after}"
        killed_after.append((after, round(pause, 2), steps[-1] if steps else 0))
    # the resume compiles nothing new: its step is the session cache's
    code, stdout, stderr = run_cli(
        *TRAIN, "--out", out, "--steps", STEPS, env={"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    )
    assert code == 0, stderr
    assert "cache hit for 'jit_train_step'" in stderr and "MISS for 'jit_train_step'" not in stderr
    assert [r["step"] for r in _records(out)] == list(range(1, STEPS + 1))
    assert _losses(out) == reference  # bit for bit
    assert _leftovers(out) == []
    _, a, _, _ = jobs.load_trained(straight[0])
    _, b, _, _ = jobs.load_trained(out)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))
    print("killed (after step, seconds later, last step logged):", killed_after)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    damaged = max(
        (p for p in (out / "checkpoints" / str(STEPS)).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(data)
    code, stdout, stderr = run_cli(*TRAIN, "--out", out, "--steps", STEPS + 1)
    assert code == 0, stderr
    aside = out / "corrupt_checkpoints" / str(STEPS)
    rel = damaged.relative_to(out / "checkpoints" / str(STEPS)).as_posix()
    assert (
        f"checkpoint step {STEPS} is corrupt ({rel} is corrupted (sha256 mismatch)); "
        f"moved it to {aside}, resuming from an earlier step"
    ) in stdout.splitlines()
    assert f"resuming from step {STEPS - 1} of {STEPS + 1} ({out / 'checkpoints' / str(STEPS - 1)})" in stdout
    assert (aside / rel).read_bytes() == bytes(data)  # kept as found, for inspection
    assert [r["step"] for r in _records(out)] == list(range(1, STEPS + 2))
    assert _losses(out)[STEPS] == _losses(straight[0])[STEPS]  # step 8 done again, bit for bit


@pytest.fixture
def tmpfs(tmp_path):
    """A function mounting a tmpfs of a given size at a new folder; all unmounted at the end."""
    mounted = []

    def mount(name: str, size: str, *options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); the case needs root")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _remount(point: Path, *options: str) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(point)], check=True)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(tmpfs, straight):
    disk = tmpfs("full", "30m")  # one checkpoint of the small detector (about 20 MB), not two
    out = disk / "run"
    code, stdout, stderr = run_cli(*TRAIN, "--out", out, "--steps", STEPS, "--checkpoint-every", 2)
    assert code == 1
    assert stderr == (
        f"lucid-jax: error: {out / 'checkpoints'}: no space left on device while writing step 4; "
        "the last complete checkpoint is step 2\n"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert _leftovers(disk) == []
    verify_checkpoint(out / "checkpoints" / "2")
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]

    _remount(disk, "size=64m")  # space freed: the run resumes from its last checkpoint
    code, stdout, stderr = run_cli(*TRAIN, "--out", out, "--steps", STEPS, "--checkpoint-every", 2)
    assert code == 0, stderr
    assert f"resuming from step 2 of {STEPS} ({out / 'checkpoints' / '2'})" in stdout
    assert "log: dropped 2 record(s) past step 2, written after the last checkpoint" in stdout
    assert [r["step"] for r in _records(out)] == list(range(1, STEPS + 1))
    assert _losses(out) == _losses(straight[0])  # as if the disk had never filled

    # prediction's drawings onto a full disk: one line, no partial PNG
    full = tmpfs("tiny", "16k")
    with open(full / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    image = disk.parent / "photo.png"
    Image.new("RGB", (80, 60), (120, 90, 60)).save(image)
    code, _, stderr = run_cli("predict", image, "--checkpoint", straight[0], "--out", full, "--draw", "--no-progress")
    assert code == 1
    assert stderr == f"lucid-jax: error: {full / 'photo_detections.png'}: no space left on device\n"
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_a_read_only_folder_is_one_line_and_left_as_it_was(tmpfs, straight):
    disk = tmpfs("ro", "64m")
    out = disk / "run"
    shutil.copytree(straight[0], out)
    (disk / "pred").mkdir()
    before = {p: p.stat().st_mtime_ns for p in disk.rglob("*")}
    _remount(disk, "ro")
    code, stdout, stderr = run_cli(*TRAIN, "--out", out, "--steps", STEPS + 2)
    assert (code, stdout) == (1, "")
    assert stderr == f"lucid-jax: error: {out / '.lock'}: read-only file system\n"
    image = disk.parent / "photo.png"
    Image.new("RGB", (80, 60), (120, 90, 60)).save(image)
    code, _, stderr = run_cli("predict", image, "--checkpoint", out, "--out", disk / "pred", "--no-progress")
    assert code == 1
    assert stderr == f"lucid-jax: error: {disk / 'pred' / 'detections.json'}: read-only file system\n"
    assert {p: p.stat().st_mtime_ns for p in disk.rglob("*")} == before


def test_quota_and_other_faults_are_named_in_one_line(tmp_path):
    # EDQUOT cannot be provoked without a quota-enabled file system: its mapping is checked
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "x.json"))
    assert describe(quota) == f"{tmp_path / 'x.json'}: disk quota exceeded"
    orbax = ValueError("RESOURCE_EXHAUSTED: Error writing \"params.w/0\" ... Disk quota exceeded [os_error_code='122']")
    assert fault_errno(RuntimeError("wrapped")) is None
    try:
        try:
            raise orbax
        except ValueError as e:
            raise RuntimeError("orbax failed") from e
    except RuntimeError as e:
        assert fault_errno(e) == errno.EDQUOT
    assert str(
        StorageError(errno.EDQUOT, "OUT/checkpoints", "while writing step 5; the last complete checkpoint is step 4")
    ) == ("OUT/checkpoints: disk quota exceeded while writing step 5; the last complete checkpoint is step 4")
    for code, words in [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ]:
        assert describe(OSError(code, os.strerror(code), "f")) == f"f: {words}"

    # a fault inside atomic_path: the file keeps its old content, no partial file stays
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(StorageError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp))
    assert str(err.value) == f"{target}: disk quota exceeded"
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_the_lock_names_its_owner_and_warns_where_locks_are_unreliable(tmp_path, monkeypatch):
    held = run_lock.RunLock(tmp_path)
    assert held.held and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(JobError) as err:
        run_lock.RunLock(tmp_path)  # another open file description: flock refuses it
    assert (
        str(err.value) == f"{tmp_path} is in use by another run (pid {os.getpid()}); wait for it or use another --out"
    )
    held.release()
    again = run_lock.RunLock(tmp_path)  # released: free again
    assert again.held
    again.release()

    notes = []
    monkeypatch.setattr(run_lock, "filesystem_type", lambda path: "nfs4")
    unlocked = run_lock.RunLock(tmp_path / "..", notes.append)
    assert not unlocked.held
    assert notes == [
        f"warning: {tmp_path / '..'} is on nfs4, where file locks are not reliable; "
        f"it is not locked, so start no other run with --out {tmp_path / '..'}"
    ]


def test_a_fault_in_the_log_or_its_tensorboard_thread_is_one_line(tmp_path, monkeypatch):
    import threading

    from lucid_jax.jobs import run_log

    log = run_log.RunLog(tmp_path, start=0)
    log.write({"step": 1, "total_loss": 1.0, "finite": 1.0})

    class _EventLoggerThread(threading.Thread):  # named as tensorboardX's writer thread is
        def run(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tb" / "events"))

    monkeypatch.setattr(run_log, "_THREAD_FAULTS", [])
    thread = _EventLoggerThread()
    thread.start()
    thread.join()  # its traceback is kept, not printed
    with pytest.raises(StorageError) as err:
        log.write({"step": 2, "total_loss": 0.5, "finite": 1.0})
    assert str(err.value) == f"{tmp_path / 'tb' / 'events'}: no space left on device while logging step 2"
    log.close()
    assert [r["step"] for r in _records(tmp_path)] == [1]  # the record of the failed step is not half-written

    # a fault writing log.jsonl itself names the file and the step
    log = run_log.RunLog(tmp_path, start=1)

    class Full:
        def write(self, text):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        def close(self):
            pass

    log._file = Full()
    with pytest.raises(StorageError) as err:
        log.write({"step": 2, "total_loss": 0.5, "finite": 1.0})
    assert str(err.value) == f"{tmp_path / 'log.jsonl'}: disk quota exceeded while logging step 2"
    log.close()


def test_the_log_is_cut_back_to_the_restored_step(tmp_path):
    from lucid_jax.jobs.run_log import truncate_log

    lines = [json.dumps({"step": 0, "dropped_boxes": 3})]
    lines += [json.dumps({"step": s, "total_loss": s}) for s in range(1, 6)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "total_lo')  # cut short by a kill
    assert truncate_log(tmp_path, 5) == 1  # only the cut line
    assert truncate_log(tmp_path, 5) == 0 and (tmp_path / "log.jsonl").read_text() == "\n".join(lines) + "\n"
    assert truncate_log(tmp_path, 3) == 2
    assert [r["step"] for r in _records(tmp_path)] == [0, 1, 2, 3]
    assert truncate_log(tmp_path, 0) == 4 and (tmp_path / "log.jsonl").read_text() == ""  # a fresh start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
