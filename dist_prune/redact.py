"""Credentials out of everything dist-prune prints or stores: `user:password@` in URIs and the
values of environment variables whose names say they are secrets. Imports nothing heavy: the
job commands (`dist-prune jobs`, `logs`) and `dist-prune config` use it without torch or mlflow.
"""

from __future__ import annotations

import os
import re
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN(?!IZER)|API_?KEY|ACCESS_?KEY|CREDENTIAL|PRIVATE_?KEY", re.I)


def redact_uri(uri: str) -> str:
    """Drop user:password@ from a URI so that it can be printed."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # "Invalid IPv6 URL": it may still hold user:password@
        return scrub(uri, ())
    if parts.username or parts.password:
        # the host and port as written: rebuilding them from .hostname and .port raised on a URI
        # with no host (TypeError) or a port that is not a number (ValueError), and lost an IPv6
        # address's brackets
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return uri


def env_secrets() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 6]


# the userinfo of a URI in running text: everything from :// to the last @ before the path or a
# space, so a token alone (https://TOKEN@host) and a password holding an @ are masked whole
USERINFO = re.compile(r"(\w+://)[^/\s]*@")


def scrub(value: str, secrets: Sequence[str]) -> str:
    """Mask secret env values and the userinfo (user:password@, TOKEN@) of URIs."""
    for s in secrets:
        value = value.replace(s, "***")
    return USERINFO.sub(r"\1***@", value)
