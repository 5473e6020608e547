"""requirements.lock: the exact versions `make test` installs. It must cover every dependency
pyproject.toml names, within its range, and the environment the tests run in must be it."""

from __future__ import annotations

import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["smollm2"]]


def test_lock_pins_every_declared_dependency_within_its_range():
    pins = _lock()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock (make lock)"
        # the local label of torch's CPU build (+cpu) does not take part in range checks
        assert req.specifier.contains(Version(pins[name].public), prereleases=True), \
            f"requirements.lock has {name}=={pins[name]}, outside pyproject.toml's {req}"
        for extra in req.extras:  # ray[default,train], mlflow[auth]: their extras' packages too
            for dep in metadata.requires(req.name) or []:
                dep = Requirement(dep)
                if dep.marker and dep.marker.evaluate({"extra": extra}) and \
                        not dep.marker.evaluate({"extra": ""}):
                    assert canonicalize_name(dep.name) in pins, f"{dep.name} ({req}) is not locked"


def test_the_test_environment_is_the_lock():
    """A venv kept from an older resolution hides what a fresh machine gets (transformers 5.24
    broke every job while a kept 5.23 venv passed): `make test` rebuilds it when the lock changes."""
    # the venv's own site-packages only: Ray puts its vendored ray/thirdparty_files (colorama,
    # setproctitle) on sys.path once it is imported, and those are not installed packages
    site = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in metadata.distributions(path=sorted(site))}
    installed.pop("dist-prune", None)
    pins = _lock()
    differ = {n: (str(pins.get(n)), str(installed.get(n))) for n in pins.keys() | installed.keys()
              if pins.get(n) != installed.get(n)}
    assert not differ, f"installed differs from requirements.lock (lock, installed): {differ}"
