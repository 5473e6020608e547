"""Where files go: the checks on export.dir, the lock a job holds on it, and the rename that
publishes a finished export without ever leaving export.dir without a complete one; and where
`pull` and `decompress` may create a directory, checked before anything is fetched or written,
so that a path through a regular file or a symbolic link is one line, not an OSError from mkdir
or rename after the download.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from dist_prune.errors import UserError
from dist_prune.io.shards import SPARSITY_FILE, fsync_dir


def _is_dist_prune_export(path: Path) -> bool:
    try:
        meta = json.loads((path / SPARSITY_FILE).read_text())
        return str(meta.get("producer", "")).startswith("dist-prune")
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(final_dir: Path, overwrite: bool = False) -> None:
    """Refuse an existing destination unless it is empty, or a dist-prune export and `overwrite`."""
    if final_dir.is_symlink():  # a rename would replace the link, not the export it points at
        raise UserError(f"export.dir {final_dir} is a symbolic link; give the directory itself")
    if not final_dir.exists():
        return
    if not final_dir.is_dir():
        raise UserError(f"export target {final_dir} exists and is not a directory")
    if not any(final_dir.iterdir()):
        return
    if not _is_dist_prune_export(final_dir):
        raise UserError(f"export target {final_dir} exists and is not a dist-prune export; "
                        "choose another directory or remove it")
    if not overwrite:
        raise UserError(f"export.dir {final_dir} already holds a dist-prune export; set "
                        "export.overwrite=true to replace it, or choose another directory")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _same_or_inside(path: Path, other: Path) -> bool:
    """Whether `path` (existing or not) is `other` or lies inside it, by device and inode, so that
    links, bind mounts and `..` cannot disguise it."""
    target = _identity(other)
    return target is not None and any(_identity(p) == target for p in (path, *path.parents))


def check_not_an_input(export_dir: Path, inputs: Mapping[str, Path | None]) -> None:
    """Refuse an export.dir that is, contains or lies inside one of the job's inputs ({key: path}):
    publishing the export replaces that directory, and a source model written into is no longer
    the model its lineage names."""
    export_dir = Path(export_dir)
    for key, path in inputs.items():
        if path is None:
            continue
        path = Path(path)
        if _same_or_inside(export_dir, path) or _same_or_inside(path, export_dir):
            raise UserError(f"export.dir {export_dir} overlaps {key} {path}: the export would replace "
                            "or write into the job's own input; choose a directory outside it")


@contextlib.contextmanager
def exclusive(final_dir: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside export.dir for a whole job: a second job given the same export.dir
    fails at once, in one line, instead of replacing the first one's export at the end. An flock:
    the kernel releases it when the holder dies, so a killed job never blocks the next one.
    Folders made for the lock that are still empty at the end (a failed job) are removed."""
    final_dir = Path(final_dir)
    made = [p for p in (final_dir.parent, *final_dir.parent.parents) if not p.exists()]
    lock = final_dir.parent / f".{final_dir.name}.lock"
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock, final_dir)
    except OSError as e:  # no permission, a read-only file system, a link planted at the lock's name
        raise UserError(f"export.dir {final_dir}: cannot create {lock} ({e.strerror or e})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: a waiting job finds the file gone and makes its own
        os.close(fd)
        for folder in made:  # the deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _lock(lock: Path, final_dir: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise UserError(f"export.dir {final_dir} is being written by another job ({holder}); wait "
                            "for it to finish or choose another export.dir") from None
        except OSError:  # a file system without flock: the publish-time checks still hold
            break
        try:  # its last holder may have removed the file between our open and our flock
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
    return fd


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step with renameat2(RENAME_EXCHANGE) (Linux 3.15+, glibc 2.28+;
    ext4, xfs, btrfs, tmpfs); False where the C library or the file system lacks it (NFS)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap(new: Path, final: Path) -> Path:
    """Put directory `new` at `final`, which holds an export, and return where the old one went.
    One exchange where the file system has it, so `final` holds a complete export at every
    instant; else two renames, the old export moved aside first (never lost: put back when the
    second rename fails)."""
    if _exchange(new, final):
        return new
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    return old


def publish(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Rename the finished export `tmp_dir` to `final_dir`: onto nothing or an empty folder, or
    with `overwrite` in one swap with the export there, which is deleted only afterwards."""
    check_destination(final_dir, overwrite)  # re-check: something may have appeared meanwhile
    if not (overwrite and final_dir.exists() and any(final_dir.iterdir())):
        try:
            os.rename(tmp_dir, final_dir)  # replaces an empty folder, never a full one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise UserError(f"export.dir {final_dir} was written by someone else while this job "
                            "ran; this job's export is discarded") from None
        fsync_dir(final_dir.parent)
        return
    old = _swap(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if any(old.iterdir()) and not _is_dist_prune_export(old):  # replaced between check and swap
        _swap(old, final_dir)
        raise UserError(f"export target {final_dir} changed into something that is not a "
                        "dist-prune export while this job ran; it is left as it was")
    shutil.rmtree(old, ignore_errors=True)  # the old export, deleted only now the new one is in place


def check_new_directory(dst: Path, *, empty_dir_ok: bool = False) -> Path:
    """`dst` made absolute, refused (UserError) when it is a symbolic link, when a path component
    above it is not a directory, or when it exists (unless an empty directory, with `empty_dir_ok`).
    A symbolic link above `dst` that leads to a directory is fine: it names where `dst` goes."""
    dst = Path(dst).absolute()
    if dst.is_symlink():  # rename() would replace the link, or fail on where it points
        raise UserError(f"destination {dst} is a symbolic link; name a new directory")
    for parent in dst.parents:
        if parent.is_symlink() or parent.exists():  # the deepest part of the path that exists
            if not parent.is_dir():
                raise UserError(f"destination {dst} cannot be created: {parent} is not a directory")
            break
    if dst.exists():
        if not dst.is_dir():
            raise UserError(f"destination {dst} already exists and is not a directory")
        if not empty_dir_ok or any(dst.iterdir()):
            raise UserError(f"destination {dst} already exists" + (" and is not empty" if empty_dir_ok else ""))
    return dst
