"""Issue 21, class 2: a job never overwrites its own inputs or another export. export.dir may not
be, contain or lie inside an input; an existing export is replaced only with export.overwrite=true,
then in one atomic swap that deletes the old export only once the new one is in place; a second
job into the same export.dir fails at once."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_bad_security import case, refused, snapshot  # noqa: F401 - `case` is a fixture
from test_bad_inputs import small

from dist_prune.errors import UserError
from dist_prune.io import destination
from dist_prune.io.destination import exclusive
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import TensorSpec
from dist_prune.io.verify import verify_export


def export(out: Path, value: float, *, overwrite: bool = False, size: int = 64) -> Path:
    """A small dist-prune export whose tensor holds `value` everywhere."""
    with StreamingExport(out, [TensorSpec("w", (size,), torch.float32)], 10**6, overwrite=overwrite) as ex:
        ex.write("w", torch.full((size,), value))
        return ex.finish({"model_type": "llama"}, [], {"pruned_tensors": ["w"], "value": value})


RELATIONS = {  # how export.dir relates to an input -> (export.dir, the key the one line names)
    "is model.path": (lambda c: c["model"], "model.path"),
    "inside model.path": (lambda c: c["model"] / "pruned", "model.path"),
    "contains model.path": (lambda c: c["root"], "model.path"),
    "a link to model.path": (lambda c: c["root"] / "alias", "model.path"),
    "model.path through ..": (lambda c: c["model"] / ".." / "model", "model.path"),
    "holds the calibration text": (lambda c: c["text"].parent, "data.calibration.path"),
}


@pytest.mark.parametrize("relation", list(RELATIONS))
def test_export_dir_overlapping_an_input_is_refused(relation, case, capsys):
    (case["root"] / "alias").symlink_to(case["model"])
    target, key = RELATIONS[relation]
    before = snapshot(case["root"])
    err = refused(["run", *small(case), f"export.dir={target(case)}", "export.overwrite=true"], capsys)
    assert f"overlaps {key} " in err and "the export would replace or write into the job's own input" in err
    assert snapshot(case["root"]) == before


def test_a_source_that_is_a_dist_prune_export_is_not_overwritten_by_its_own_job(case, capsys):
    """The issue's case: model.path = export.dir, the source an export of an earlier job."""
    from test_registry import make_export

    source, _ = make_export(case["root"], 0)
    before = snapshot(source)
    err = refused(["run", *small(case, source), f"export.dir={source}", "export.overwrite=true"], capsys)
    assert err.startswith(f"dist-prune: error: export.dir {source} overlaps model.path {source}")
    assert snapshot(source) == before


def test_an_existing_export_is_replaced_only_with_export_overwrite(case, capsys):
    out = export(case["root"] / "out", 1.0)
    before = snapshot(out)
    err = refused(["run", *small(case), f"export.dir={out}"], capsys)
    assert err == (f"dist-prune: error: export.dir {out} already holds a dist-prune export; set "
                   "export.overwrite=true to replace it, or choose another directory")
    assert snapshot(out) == before
    with pytest.raises(UserError, match="export.overwrite=true"):
        export(out, 2.0)
    assert verify_export(out)["value"] == 1.0


def test_replacement_never_leaves_export_dir_without_a_complete_export(tmp_path, monkeypatch):
    """After every rename or exchange of a replacement, export.dir holds a whole export."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not destination._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system has no atomic exchange (RENAME_EXCHANGE); the fallback is tested below")
    out = export(tmp_path / "out", 0.0)
    complete: list[bool] = []

    def then_look(op):
        def step(src, dst):
            result = op(src, dst)
            complete.append((out / "sparsity.json").is_file() and (out / "model.safetensors").is_file())
            return result
        return step

    monkeypatch.setattr(destination, "_exchange", then_look(destination._exchange))
    monkeypatch.setattr(os, "rename", then_look(os.rename))
    for i in range(1, 4):
        export(out, float(i), overwrite=True)
    assert complete and all(complete), complete
    assert verify_export(out)["value"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no old or temporary copy left


def test_without_an_atomic_exchange_the_old_export_survives_a_failed_swap(tmp_path, monkeypatch):
    """Where the file system has no exchange (NFS): old export aside, new one in. If the second
    rename fails the old export is put back, whole."""
    out = export(tmp_path / "out", 1.0)
    monkeypatch.setattr(destination, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected I/O error", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="injected"):
        export(out, 2.0, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert calls[0].startswith(".out.old-") and calls[1] == "out"
    assert verify_export(out)["value"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    export(out, 3.0, overwrite=True)  # and without the fault, the two renames replace it
    assert verify_export(out)["value"] == 3.0 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_export_that_appears_while_a_job_runs_is_never_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with StreamingExport(out, [TensorSpec("w", (4,), torch.float32)], 10**6) as ex:
        ex.write("w", torch.ones(4))
        export(out, 7.0)  # someone else's export, published meanwhile
        with pytest.raises(UserError, match="already holds a dist-prune export"):
            ex.finish({}, [], {"pruned_tensors": ["w"]})
    assert verify_export(out)["value"] == 7.0
    # the last guard, even with the check skipped: the rename refuses a full directory
    ex = StreamingExport(out, [TensorSpec("w", (4,), torch.float32)], 10**6, overwrite=True)
    ex.write("w", torch.ones(4))
    monkeypatch.setattr(destination, "check_destination", lambda final_dir, overwrite: None)
    with pytest.raises(UserError, match="was written by someone else while this job ran"):
        destination.publish(ex.tmp_dir, out, overwrite=False)
    ex.abort()
    assert verify_export(out)["value"] == 7.0 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


HOLD = ("import sys, time; from pathlib import Path; from dist_prune.io.destination import exclusive\n"
        "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")


def test_a_second_job_into_the_same_export_dir_fails_at_once(case, capsys):
    out = case["root"] / "exports" / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(["run", *small(case), f"export.dir={out}", "registry.enabled=false"], capsys)
        assert err.startswith(f"dist-prune: error: export.dir {out} is being written by another job "
                              f"(pid {holder.pid} on ") and err.endswith("wait for it to finish or choose another export.dir")
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized()  # refused before Ray starts
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel dropped the killed holder's lock: the next job is not blocked by its leftover file
    assert (out.parent / ".out.lock").exists()
    started = time.monotonic()
    with exclusive(out):
        assert time.monotonic() - started < 1
    assert list(out.parent.iterdir()) == []


def test_the_lock_removes_the_folders_it_made_when_nothing_was_exported(tmp_path):
    with exclusive(tmp_path / "a" / "b" / "out"):
        assert (tmp_path / "a" / "b" / ".out.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_that_cannot_be_made_is_one_line(tmp_path):
    """A link planted at the lock's name is never followed (it could truncate any file)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(UserError, match=r"export.dir .*/out: cannot create .*/\.out\.lock \(Too many levels of symbolic links\)"):
        with exclusive(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("store", ["sqlite:///{root}/exports/mlflow.db", "file://{root}/exports/mlruns",
                                   "{root}/exports/mlruns"])
def test_export_dir_around_the_registry_store_is_refused(store, case, capsys):
    """Replacing an export.dir that holds the MLflow store (its database, its artifacts) would
    delete the only copy of every registered version."""
    store = store.format(root=case["root"])
    (case["root"] / "exports").mkdir()
    err = refused(["run", *small(case), f"export.dir={case['root'] / 'exports'}", f"registry.tracking_uri={store}"],
                  capsys)
    assert f"export.dir {case['root'] / 'exports'} overlaps registry." in err
    assert sorted(p.name for p in (case["root"] / "exports").iterdir()) == []
