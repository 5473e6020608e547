"""Stage 2a, data: calibration and evaluation text as windows of token ids.

Tokenization happens once, on the driver; workers receive small int tensors and
take every W-th window (data parallel), so calibration and evaluation cost 1/W each.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

import torch

from dist_prune.errors import UserError

# Modules whose docstrings make up the built-in corpus: English prose about software,
# shipped with every Python, so a job needs no download to calibrate.
CORPUS_MODULES = (
    "abc argparse array asyncio base64 bisect calendar codecs collections configparser "
    "contextlib copy csv dataclasses datetime decimal difflib doctest email enum fractions "
    "functools gettext glob gzip hashlib heapq hmac html http.client inspect io ipaddress "
    "itertools json locale logging lzma mailbox mimetypes multiprocessing numbers operator "
    "optparse os pathlib pickle pprint queue random re reprlib sched secrets selectors shelve "
    "shlex shutil signal smtplib socket sqlite3 ssl statistics string struct subprocess "
    "tarfile tempfile textwrap threading timeit tokenize traceback types typing unittest "
    "urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile zoneinfo"
).split()
HELD_OUT = 0.1  # last 10% of the built-in corpus is kept for evaluation


def builtin_corpus() -> str:
    """Module, class and function docstrings of `CORPUS_MODULES`, in a fixed order."""
    parts = []
    with warnings.catch_warnings():  # getmembers touches deprecated attributes (typing.io)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            parts += _docstrings(name)
    return "\n\n".join(p for p in parts if p.strip())


def _docstrings(name: str) -> list[str]:
    """The docstrings of module `name` and of what it defines, sorted by attribute name."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return []
    parts = [inspect.getdoc(module) or ""]
    for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
        if getattr(obj, "__module__", None) == module.__name__ and (doc := inspect.getdoc(obj)):
            parts.append(doc)
    return parts


def read_text(path: str | None, *, role: str) -> str:
    """Text of `path`, or the built-in corpus: its first 90% for calibration, the rest for eval."""
    if path is None:
        text = builtin_corpus()
        cut = int(len(text) * (1 - HELD_OUT))
        return text[:cut] if role == "calibration" else text[cut:]
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{role} text {path}: cannot be read as UTF-8 ({type(e).__name__})") from None
    if not text.strip():
        raise UserError(f"{role} text {path} is empty")
    return text


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All token ids of `text` as one 1-D int64 tensor (no BOS: windows are cut from the stream)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                        *, source: str) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets, as in the Wanda
    and SparseGPT reference loaders. Shape [num_samples, seq_len]."""
    if ids.numel() < seq_len + 1:
        raise UserError(f"calibration text {source} has {ids.numel()} tokens, fewer than one window "
                        f"of data.calibration.seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, num_windows: int, seq_len: int, *, source: str) -> torch.Tensor:
    """The first `num_windows` consecutive non-overlapping windows. Shape [num_windows, seq_len]."""
    needed = num_windows * seq_len
    if ids.numel() < needed:
        raise UserError(f"eval text {source} has {ids.numel()} tokens, fewer than eval.num_windows="
                        f"{num_windows} x eval.seq_len={seq_len} = {needed}")
    return ids[:needed].reshape(num_windows, seq_len)


def shard(windows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's windows: every `world_size`-th, starting at `rank`."""
    return windows[rank::world_size]


def read_training_text(path: str | None, *, text_column: str = "text", split: str = "train") -> str:
    """Fine-tuning text: a UTF-8 file, or a Hugging Face `datasets` directory written by
    `save_to_disk` (a Dataset, or a DatasetDict and its `split`), rows joined by blank
    lines; empty = the calibration part of the built-in corpus."""
    if path is None or not Path(path).is_dir():
        return read_text(path, role="finetune")
    try:
        import datasets  # optional: only a `datasets` directory needs it
    except ImportError:
        raise UserError(f"finetune.data.path {path} is a directory: reading a `datasets` directory "
                        "needs `pip install datasets` (or give a text file)") from None
    try:
        data = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"finetune.data.path {path}: not a `datasets` directory written by "
                        f"save_to_disk ({str(e).splitlines()[0]})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"finetune.data.split '{split}' is not in {path} (splits: {', '.join(data)})")
        data = data[split]
    if text_column not in data.column_names:
        raise UserError(f"finetune.data.text_column '{text_column}' is not a column of {path} "
                        f"(columns: {', '.join(data.column_names)})")
    text = "\n\n".join(row for row in data[text_column] if row)
    if not text.strip():
        raise UserError(f"finetune.data.path {path}: column '{text_column}' holds no text")
    return text


def training_windows(ids: torch.Tensor, seq_len: int, *, source: str) -> torch.Tensor:
    """Every consecutive non-overlapping window of `seq_len` tokens. Shape [n, seq_len]."""
    count = ids.numel() // seq_len
    if count == 0:
        raise UserError(f"training text {source} has {ids.numel()} tokens, fewer than one window of "
                        f"finetune.data.seq_len={seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)
