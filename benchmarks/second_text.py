"""The second evaluation text: quotations, aphorisms and verse from the fortune cookie files of
Debian's `fortunes` package, far from WikiText's encyclopaedia articles; nothing in dist-prune is
calibrated or tuned on it.

    python benchmarks/second_text.py            # rebuilds benchmarks/data/fortunes.txt, checks it

The text is committed; this script says where it comes from and rebuilds it byte for byte: it
downloads the package with `apt-get download` (the Debian archive is reachable where PyPI is),
checks the .deb's sha256, and joins the files of FILES in that order, one blank line between
cookies instead of the `%` lines. Every quality benchmark measures perplexity on WikiText-2 test
and on this text (`eval.extra_paths`), so a gain bought by fitting WikiText shows up.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "fortunes=1:1.99.1-7.3"
DEB_SHA256 = "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"
FILES = ("wisdom", "humorists", "people")
OUT = Path(__file__).resolve().parent / "data" / "fortunes.txt"
TEXT_SHA256 = "380eb167da8f9151b8b1b5d9195f04bd3758429591a48c4a65f6e3ad31a35175"


def build(deb: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp) / "usr/share/games/fortunes"
        cookies = []
        for name in FILES:
            text = (root / name).read_text(encoding="utf-8", errors="strict")
            cookies += [c.strip("\n") for c in text.split("\n%\n") if c.strip()]
    return "\n\n".join(c.rstrip("%").rstrip() for c in cookies) + "\n"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("fortunes_*.deb"))
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != DEB_SHA256:
            print(f"{deb.name}: sha256 {digest}, expected {DEB_SHA256}", file=sys.stderr)
            return 1
        text = build(deb)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    print(f"{OUT}: {len(text):,} characters, sha256 {digest}")
    return 0 if digest == TEXT_SHA256 else 1


if __name__ == "__main__":
    sys.exit(main())
