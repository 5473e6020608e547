"""What a job may read from a model directory, and how its side files reach the export.

A model directory is often a cloned repository: input from a stranger. A symbolic link in it
(`generation_config.json -> ~/.netrc`, a weight shard pointing anywhere) would otherwise be read,
copied into export.dir and uploaded to the registry. So every entry of the directory must resolve
inside it, or inside the blob store of a Hugging Face cache snapshot, whose files are all links
to `../../blobs/<sha>`. A side file (tokenizer, generation config, chat template) is read once,
without following a link, parsed if it has a format (JSON, Jinja), and exactly those bytes are
written into the export.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from dist_prune.errors import UserError

# The largest side file read whole: tokenizer.json of a 256k-token vocabulary is about 35 MB.
MAX_SIDE_FILE = 256 * 1024**2


def allowed_roots(directory: Path) -> list[Path]:
    """Where the entries of `directory` may point: itself, and for a Hugging Face cache snapshot
    (models--ORG--NAME/snapshots/REV) the repository's blobs/ beside snapshots/."""
    root = Path(directory).resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def inside(directory: Path, name: str, what: str = "model.path") -> Path:
    """The resolved path of `name` in `directory`; UserError if it leads out of the directory
    (`../x`, an absolute name, a link to elsewhere)."""
    path = (Path(directory) / name).resolve()
    if not _within(path, allowed_roots(directory)):
        raise UserError(f"{what} {directory}: {name} leads outside the directory (to {path})")
    return path


def check_contained(directory: Path, what: str = "model.path") -> None:
    """Refuse a directory with a symbolic link that resolves outside it (a file or a folder, at
    any depth) or an entry that is neither a file, a folder nor a link (a FIFO named
    model.safetensors would block the first read of it forever)."""
    directory = Path(directory)
    roots = allowed_roots(directory)
    for parent, folders, files in os.walk(directory):  # does not descend into linked folders
        for name in (*folders, *files):
            path = Path(parent) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(directory)
            if stat.S_ISLNK(mode):
                target = path.resolve()
                if not _within(target, roots):
                    raise UserError(f"{what} {directory}: {relative} is a symbolic link to {target}, outside "
                                    "the directory; copy the file in instead of linking it")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UserError(f"{what} {directory}: {relative} is not a regular file")


def read_side_file(path: Path) -> bytes:
    """The bytes of side file `path`, read without following a link, checked by its format: a
    .json file must be a JSON object (a chat template inside it valid Jinja), a .jinja file a
    valid Jinja template, a .txt file UTF-8 text. UserError naming the file otherwise."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        link = " (a symbolic link: side files are copied, never followed)" if path.is_symlink() else ""
        raise UserError(f"side file {path} cannot be read{link}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"side file {path} is not a regular file")
        if info.st_size > MAX_SIDE_FILE:
            raise UserError(f"side file {path} is {info.st_size:,} bytes, over the {MAX_SIDE_FILE:,} "
                            "a tokenizer or config file may have")
        data = f.read(MAX_SIDE_FILE + 1)
    _check_format(path, data)
    return data


def _check_format(path: Path, data: bytes) -> None:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jinja", ".txt"):
        return  # e.g. tokenizer.model, a sentencepiece protobuf: its size and kind were checked
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"side file {path} is not UTF-8 text (byte {e.start})") from None
    if suffix == ".jinja":
        _check_jinja(path, text)
    elif suffix == ".json":
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UserError(f"side file {path} is not valid JSON (line {getattr(e, 'lineno', '?')}: "
                            f"{getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise UserError(f"side file {path} nests JSON too deeply") from None
        if not isinstance(value, dict):
            raise UserError(f"side file {path} must hold a JSON object, not {type(value).__name__}")
        for template in _chat_templates(value.get("chat_template")):
            _check_jinja(path, template, "its chat_template")


def _chat_templates(value) -> list[str]:
    """tokenizer_config.json's (or chat_template.json's) chat_template: one template, or a list of
    {"name", "template"}."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t.get("template") if isinstance(t, dict) else t for t in value]
    return [] if value is None else [value]


def _check_jinja(path: Path, text, part: str | None = None) -> None:
    """`text` (the file, or `part` of it) must parse as a Jinja template."""
    from jinja2 import TemplateSyntaxError  # lazy: only a model with a chat template needs Jinja
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    what = f"side file {path}" + (f": {part}" if part else "")
    if not isinstance(text, str):
        raise UserError(f"{what} is not a Jinja template (a {type(text).__name__})")
    try:
        ImmutableSandboxedEnvironment().parse(text)  # parsed only: nothing of it runs here
    except TemplateSyntaxError as e:
        raise UserError(f"{what} is not a valid Jinja template (line {e.lineno}: "
                        f"{str(e.message).splitlines()[0] if e.message else 'syntax error'})") from None
    except RecursionError:
        raise UserError(f"{what} nests Jinja blocks too deeply") from None
