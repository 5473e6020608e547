"""Model input: slices read from safetensors, pickle refused, broken checkpoints named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_prune.io.checkpoint import open_checkpoint, resolve_model
from dist_prune.errors import UserError


def test_read_flat_reads_exact_ranges(tmp_path):
    tensors = {"w": torch.randn(7, 5), "v": torch.randn(11), "c": torch.randn(3, 2, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    for name, t in tensors.items():
        flat = t.reshape(-1)
        for start, stop in [(0, flat.numel()), (3, 4), (4, 17), (5, 5), (flat.numel() - 2, flat.numel())]:
            if stop <= flat.numel():
                assert torch.equal(ckpt.read_flat(name, start, stop), flat[start:stop]), (name, start)
    assert ckpt.shape("c") == (3, 2, 4) and ckpt.dtype("w") == torch.float32


def test_read_flat_every_dtype_and_shard_position(tmp_path):
    """Bytes at the right offsets of the right shard, whatever the dtype and the tensor's place."""
    g = torch.Generator().manual_seed(0)
    first = {"a.bf16": torch.randn(6, 10, generator=g).bfloat16(), "b.f16": torch.randn(9, generator=g).half(),
             "c.scalar": torch.tensor(3.5)}
    second = {"d.i64": torch.arange(24).reshape(4, 6), "e.bool": torch.rand(5, 3, generator=g) > 0.5,
              "f.f32": torch.randn(2, 3, 4, generator=g)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    shards = {**{n: "model-00001-of-00002.safetensors" for n in first},
              **{n: "model-00002-of-00002.safetensors" for n in second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    ckpt = open_checkpoint(tmp_path)
    for name, t in {**first, **second}.items():
        flat = t.reshape(-1)
        for start in range(flat.numel()):
            got = ckpt.read_flat(name, start, flat.numel())
            assert got.dtype == t.dtype and torch.equal(got, flat[start:]), (name, start)
    assert ckpt.dtype("a.bf16") == torch.bfloat16 and ckpt.shape("c.scalar") == ()


def test_hf_directory_is_used_as_is(tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_pickle_refused_unless_allowed(tmp_path, tiny_llama):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    torch.save(load_file(tiny_llama / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle weights .*model.allow_pickle=true"):
        resolve_model(str(d))


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_truncated_shard_is_named(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="model.safetensors is truncated: "):
        open_checkpoint(d)


def test_index_naming_missing_shard(tmp_path, tiny_llama):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    names = list(load_file(d / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    with pytest.raises(UserError, match="listed in the index but missing"):
        open_checkpoint(d)


def test_garbage_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_jit_builds_use_this_environments_ninja(tmp_path, monkeypatch):
    """Two ninja versions in one build directory recompile DeepSpeed's op from scratch each time
    they alternate: every process must find this environment's ninja first."""
    import os
    import sys

    from dist_prune.io.checkpoint import configure_jit_builds

    env_bin = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(env_bin, "ninja")):
        pytest.skip("ninja is not installed in this environment")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 1.0\n")
    (fake / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}/usr/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    configure_jit_builds()
    configure_jit_builds()  # idempotent: PATH does not grow
    assert shutil.which("ninja") == os.path.join(env_bin, "ninja")
    assert os.environ["PATH"] == f"{env_bin}{os.pathsep}{fake}{os.pathsep}/usr/bin"
    assert os.path.basename(os.path.dirname(os.environ["TORCH_EXTENSIONS_DIR"])) == "torch_extensions"


def test_a_build_lock_left_by_a_stopped_build_is_cleared(tmp_path):
    """torch's JIT build lock (cpp_extension's FileBaton) outlives a build killed by Ctrl-C, and
    every later DeepSpeed start waited on it forever; a lock someone still builds under, or one
    just taken, stays."""
    import os
    import subprocess
    import sys
    import time

    from torch.utils.file_baton import FileBaton

    from dist_prune.io.checkpoint import STALE_LOCK_SECONDS, clear_stale_build_locks

    old = time.time() - 2 * STALE_LOCK_SECONDS
    locks = {}
    for op in ("stopped", "building", "just_taken"):
        (tmp_path / op).mkdir()
        locks[op] = tmp_path / op / "lock"
        locks[op].touch()
        if op != "just_taken":
            os.utime(locks[op], (old, old))
    assert not FileBaton(str(locks["stopped"])).try_acquire()  # what every later build waited on
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path / "building")
    try:
        assert clear_stale_build_locks(tmp_path) == [locks["stopped"]]
    finally:
        builder.kill()
    assert FileBaton(str(locks["stopped"])).try_acquire()
    assert locks["building"].exists() and locks["just_taken"].exists()
