"""Reaching a Ray cluster's Jobs API: which address, which auth token, one-line errors.

Address: `--address`, else `$RAY_API_SERVER_ADDRESS`, else `$RAY_ADDRESS` when it is an
http(s) URL (the same variables, in the same order, as `ray job submit`). It is the head's
dashboard URL, e.g. http://HEAD:8265; `host:port` means http://host:port. `--address` always
wins (Ray's own client would let the environment override it).

Ray token authentication (Ray 2.60, read from ray/_private/authentication and
ray/dashboard/modules/dashboard_sdk.py):
- The mode is the environment variable RAY_AUTH_MODE (`token` or `disabled`); it cannot be
  set in `--system-config`. `ray start --head` with RAY_AUTH_MODE unset turns token auth on by
  itself when it finds a token, and off otherwise; a local `ray.init()` turns it on and writes
  ~/.ray/auth_token if missing. RAY_AUTH_MODE=token with no token makes `ray start` fail.
- The token, highest precedence first: RAY_AUTH_TOKEN (the value), RAY_AUTH_TOKEN_PATH (a
  file; unreadable is fatal), ~/.ray/auth_token. `ray get-auth-token [--generate]` prints (or
  creates) it. Every node needs the same mode and token, e.g. on each node:
      export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/secure/ray_token   # same file content
      ray start --head --dashboard-host=0.0.0.0 ...     /    ray start --address=HEAD:6379
- The dashboard (and so the Jobs API, logs websocket included) wants `Authorization: Bearer
  TOKEN`; 401 means no token was sent, 403 a wrong one. Ray's JobSubmissionClient adds that
  header only when RAY_AUTH_MODE=token in the *client's* environment.
- Here the header is built explicitly and passed to JobSubmissionClient: the token comes from
  RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH, else (only when RAY_AUTH_MODE=token)
  ~/.ray/auth_token. RAY_AUTH_MODE=disabled sends nothing. So a client needs either
      RAY_AUTH_TOKEN=<token>            or   RAY_AUTH_TOKEN_PATH=<file>
  or RAY_AUTH_MODE=token with the token in ~/.ray/auth_token. The token is never printed.
- The job itself needs nothing from the client: its entrypoint is started by the cluster's
  processes and inherits their RAY_AUTH_MODE / RAY_AUTH_TOKEN(_PATH). The client's RAY_AUTH_*
  variables are therefore NOT forwarded: a client-side RAY_AUTH_TOKEN_PATH names a file that
  need not exist on the cluster (Ray aborts on an unreadable one), and a forwarded
  RAY_AUTH_TOKEN would be stored in clear in the job's runtime_env, shown by the job API.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dist_prune.errors import UserError

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CONNECT_TIMEOUT_S = 10.0


def resolve_address(address: str | None) -> str:
    """The dashboard URL: --address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS."""
    source = "--address"
    if not address:
        for name in ADDRESS_ENV:
            value = os.environ.get(name, "").strip()
            if value:
                if name == "RAY_ADDRESS" and not value.startswith(("http://", "https://")):
                    raise UserError(f"RAY_ADDRESS={value} is not the dashboard's URL; pass --address "
                                    "http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
                address, source = value, f"${name}"
                break
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 or set "
                        "RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"{source} {address}: expected the dashboard's http(s) URL, e.g. "
                        "http://HEAD:8265")
    return address.rstrip("/")


def auth_token() -> str | None:
    """The Ray auth token this client sends (see the module docstring); None: no header."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file "
                            f"({e.strerror})") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    if mode == "token":
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
        if not token:
            raise UserError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or "
                            f"RAY_AUTH_TOKEN_PATH, or write it to {default} (`ray get-auth-token` "
                            "on the head prints it)")
        return token
    return None


_AUTH_HINT = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, or "
              "RAY_AUTH_MODE=token to send ~/.ray/auth_token; `ray get-auth-token` on the head "
              "prints it")


def _check_reachable(address: str, headers: dict) -> None:
    """One quick request with a timeout, so a wrong address fails fast and in one line."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        kind = type(e).__name__
        raise UserError(f"cannot reach the Ray dashboard at {address} ({kind}); is the cluster up "
                        "and is this its dashboard URL (e.g. http://HEAD:8265)?") from None
    if r.status_code == 401:
        raise UserError(f"the Ray cluster at {address} requires token authentication and no "
                        f"token was sent: {_AUTH_HINT}")
    if r.status_code == 403:
        raise UserError(f"the Ray cluster at {address} rejected the auth token: {_AUTH_HINT}")
    if r.status_code != 200 or "ray_version" not in r.text:
        raise UserError(f"{address} does not answer like a Ray dashboard (HTTP {r.status_code} on "
                        "/api/version); give the head's dashboard URL, e.g. http://HEAD:8265")


@contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None):
    """A JobSubmissionClient for the resolved address, with the auth header when needed."""
    address = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    _check_reachable(address, headers)
    from ray.job_submission import JobSubmissionClient

    # JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its argument.
    with _without_env(ADDRESS_ENV):
        try:
            return JobSubmissionClient(address, headers=headers)
        except (ConnectionError, RuntimeError) as e:
            raise UserError(f"cannot use the Ray Jobs API at {address}: {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def api_errors(address: str, job: str | None = None) -> Iterator[None]:
    """Turn the Jobs API's exceptions into one-line UserErrors."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise UserError(f"the Ray cluster at {address} refused the auth token: {_AUTH_HINT}") from None
    except RuntimeError as e:
        text = str(e)
        if job is not None and "status code 404" in text:
            raise UserError(f"no job {job} on the Ray cluster at {address}") from None
        raise UserError(f"Ray Jobs API at {address}: {first_line(e)}") from None
    except (ConnectionError, requests.exceptions.RequestException, aiohttp.ClientError) as e:
        raise UserError(f"lost the connection to the Ray dashboard at {address} "
                        f"({type(e).__name__})") from None
