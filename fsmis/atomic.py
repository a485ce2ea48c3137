"""Atomic file writes: a temporary file in the target folder, fsync, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 minus the process umask: what a plain open() would create (mkstemp uses 0600)."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_target(path: str | Path):
    """Yield a temporary path beside ``path`` (same suffix, e.g. ``.nii.gz``); on success the file
    written there gets the usual mode and replaces ``path``; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_target(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary folder beside ``path``; on success its files are fsynced, get the usual
    modes, and the folder replaces ``path`` (any previous content); on any error it is removed, so
    ``path`` is always either complete or as it was."""
    import shutil
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    old = path.parent / f".old-{path.name}-{os.getpid()}-{time.time_ns()}"
    try:
        yield tmp
        mode = default_file_mode()
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(f, mode)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not os.path.lexists(path):  # interrupted between the two renames
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_lock(folder: str | Path, what: str = "folder", lock_file: str | Path | None = None):
    """Hold ``folder/.lock`` (or ``lock_file``; an advisory ``flock``) for the duration; a second
    process that tries gets a clear error instead of writing into the same folder. The lock goes
    with the process; a ``lock_file`` given here is removed on release (also after an error or
    Ctrl-C; a killed process leaves it, unlocked, for the next one to take)."""
    import fcntl

    folder = Path(folder)
    path = Path(lock_file) if lock_file is not None else folder / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise BusyError(f"{folder}: this {what} is in use by {holder}; wait for it to finish or use another "
                            "folder") from None
        except BaseException:
            fh.close()
            raise
        # a holder that removes its lock file on release may have done so between our open and
        # flock: then the lock is on a file nobody else sees; take the one now at ``path``
        try:
            here = os.stat(path)
            mine = os.fstat(fh.fileno())
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()}\n")
        fh.flush()
        yield path
    finally:
        if lock_file is not None:  # removed while still held, also when the work failed
            path.unlink(missing_ok=True)
        fh.close()


class BusyError(OSError):
    """The folder is locked by another process."""
