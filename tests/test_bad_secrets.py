"""Issue 21, class 5 on the driver: a password in the tracking URI is never printed, whatever the
URI's shape and however far the job gets. (What `submit`, `logs` and `jobs` do with credentials is
tests/test_launch.py's; a whole job with a password in its tracking URI, on a real server, is
tests/test_end_to_end.py's.)"""

from __future__ import annotations

import pytest

from dist_prune.cli import main

PLANTED = "planted-tracking-pw-41d7"


@pytest.mark.parametrize("uri, expected", [
    (f"http://user:{PLANTED}@127.0.0.1:9/", "cannot reach MLflow tracking server at http://127.0.0.1:9/ "
                                            "(Connection refused)"),
    (f"http://user:{PLANTED}@", "MLflow at http://: listing experiments failed: Invalid url: http://***@/api/"),
    # urlsplit raises on it: was a ValueError traceback from MLflow's store registry
    (f"http://user:{PLANTED}@[::1:5000", "MLflow tracking URI http://***@[::1:5000 is not a valid URI "
                                         "(Invalid IPv6 URL)"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_tracking_password_is_never_printed(uri, expected, dry_run, tiny_llama, text_file, tmp_path, monkeypatch,
                                              capfd):
    """capfd: what MLflow's or Ray's loggers write to the process's stderr is seen too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    code = main(["run", *dry_run, f"model.path={tiny_llama}", f"data.calibration.path={text_file}",
                 "data.calibration.num_samples=2", "data.calibration.seq_len=16", "eval.num_windows=0",
                 f"registry.tracking_uri={uri}"])
    out, err = capfd.readouterr()
    assert PLANTED not in out + err
    lines = [line for line in err.splitlines() if line.startswith("dist-prune")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"dist-prune: error: {expected}"), err[-2000:]
    assert "Traceback" not in err


def test_the_config_hash_holds_no_credentials():
    """The config's sha256, recorded in sparsity.json and as the registered version's
    lineage.config_sha256 tag, is that of the config without user:password@ in its URIs: every other
    key is in the run's params, so a hash over the password was a test for guesses of it, offline."""
    from dist_prune.config import config_sha256, load_config

    def sha(uri: str, artifacts: str = "s3://bucket/a") -> str:
        return config_sha256(load_config(None, [f"registry.tracking_uri={uri}",
                                                f"registry.artifact_location={artifacts}"], check_paths=False))

    plain = sha("http://mlflow:5000")
    assert sha(f"http://user:{PLANTED}@mlflow:5000") == sha("http://user:guess@mlflow:5000") == plain
    assert sha("http://mlflow:5000", f"s3://key:{PLANTED}@bucket/a") == plain
    assert sha("http://other:5000") != plain  # the rest of the config is hashed as before


@pytest.mark.parametrize("text, shown", [
    ("at http://bob:PLANTED@host:5000/api", "at http://***@host:5000/api"),
    ("clone https://PLANTED@github.com/org/repo", "clone https://***@github.com/org/repo"),  # a token alone
    ("s3://key:PLANT@ED@bucket/x and more", "s3://***@bucket/x and more"),                  # an @ in the password
    ("two http://a:PLANTED@h1/ http://PLANTED@h2", "two http://***@h1/ http://***@h2"),
    ("http://host:5000/run mailto a@b.c", "http://host:5000/run mailto a@b.c"),             # no userinfo: unchanged
])
def test_printed_text_masks_the_userinfo_of_every_uri(text, shown):
    from dist_prune.redact import scrub

    assert scrub(text, ()) == shown

