"""dist-prune: distributed pruning of causal LMs on Ray + DeepSpeed ZeRO-3 workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_commit() -> str | None:
    """The commit of the dist-prune checkout this runs from (lineage), None if not a checkout."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
