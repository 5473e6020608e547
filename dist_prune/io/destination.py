"""Where `pull` and `decompress` may create a directory: checked before anything is fetched or
written, so that a path through a regular file or a symbolic link is one line, not an OSError
from mkdir or rename after the download."""

from __future__ import annotations

from pathlib import Path

from dist_prune.errors import UserError


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
