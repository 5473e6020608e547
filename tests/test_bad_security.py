"""Issue 21, security and data loss: files from outside the model directory never reach a job, its
export or the registry (class 1), and a job never overwrites its own inputs or another export (class
2). Every case runs the real CLI and is refused on the driver, before Ray starts, in one line."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import small

from dist_prune.cli import main
from dist_prune.errors import UserError
from dist_prune.io.checkpoint import TOKENIZER_FILES, open_checkpoint
from dist_prune.io.export import StreamingExport
from dist_prune.io.model_files import check_contained, read_side_file
from dist_prune.io.shards import TensorSpec
from dist_prune.io.verify import verify_export

SECRET = "s3cr3t-credential-7f1c"  # planted in every file outside the model directory
SIDE_CONTENT = {  # a valid file for each side file the tiny model lacks
    "special_tokens_map.json": json.dumps({"eos_token": "<eos>", "password": SECRET}),
    "tokenizer.model": SECRET,
    "vocab.json": json.dumps({SECRET: 0}),
    "merges.txt": f"#version: 0.2\n{SECRET[:4]} {SECRET[4:]}\n",
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}" + SECRET,
    "model.safetensors.index.json": json.dumps({"metadata": {"token": SECRET}, "weight_map": {}}),
}


@pytest.fixture
def case(tiny_llama, tmp_path, monkeypatch) -> dict[str, Path]:
    """A copy of the tiny model, a text in data/, an empty `outside` folder; the working directory is
    tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "text.txt").write_text("a few words of calibration text, repeated. " * 400)
    (tmp_path / "outside").mkdir()
    return {"model": model, "text": tmp_path / "data" / "text.txt", "outside": tmp_path / "outside", "root": tmp_path}


def refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one line and no traceback. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_nothing_left(root: Path) -> None:
    """No export, registry, lock or temporary directory appeared in the working directory."""
    assert sorted(p.name for p in root.iterdir()) == ["data", "model", "outside"]


# -- class 1: links out of the model directory ---------------------------------------------------

LINKED = (*TOKENIZER_FILES, "config.json", "model.safetensors", "model.safetensors.index.json")


@pytest.mark.parametrize("kind", ["absolute", "relative", "through an inside link"])
@pytest.mark.parametrize("name", LINKED)
def test_a_link_out_of_the_model_directory_is_refused(name, kind, case, capsys):
    """Each file a job reads (weights, index, config, tokenizer, generation config, templates) as a
    link to a file elsewhere that holds a valid copy: only the link itself can be refused."""
    model, outside = case["model"], case["outside"]
    secret = outside / name
    if (model / name).exists():
        shutil.move(model / name, secret)
    else:
        secret.write_text(SIDE_CONTENT[name])
    target = {"absolute": secret, "relative": Path("..") / "outside" / name,
              "through an inside link": Path(".hop")}[kind]
    if kind == "through an inside link":
        (model / ".hop").symlink_to(secret)
    (model / name).symlink_to(target)
    err = refused(["run", *small(case)], capsys)
    assert f"is a symbolic link to {secret}, outside the directory" in err
    assert_nothing_left(case["root"])


@pytest.mark.parametrize("depth", [1, 3])
def test_a_linked_folder_out_of_the_model_directory_is_refused(depth, case, capsys):
    """A folder of templates (additional_chat_templates/) linked elsewhere, at any depth."""
    model, outside = case["model"], case["outside"]
    (outside / "templates").mkdir()
    (outside / "templates" / "tool_use.jinja").write_text("{{ '" + SECRET + "' }}")
    parent = model.joinpath(*["sub"] * (depth - 1))
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "additional_chat_templates").symlink_to(outside / "templates")
    err = refused(["run", *small(case)], capsys)
    assert f"additional_chat_templates is a symbolic link to {outside / 'templates'}" in err


@pytest.mark.parametrize("shard", ["../outside/stolen.safetensors", "{outside}/stolen.safetensors",
                                   "sub/../../outside/stolen.safetensors"])
def test_an_index_naming_a_shard_outside_is_refused(shard, case, capsys):
    model, outside = case["model"], case["outside"]
    shutil.copy(model / "model.safetensors", outside / "stolen.safetensors")
    shard = shard.format(outside=outside)
    names = list(open_checkpoint(model).weight_map)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    err = refused(["run", *small(case)], capsys)
    # the index parser (io/shards.read_index) refuses any path in a shard name, before a file is resolved
    assert err.endswith(f"is placed in {shard!r}; a shard must be a *.safetensors file name in the same directory)")


def test_a_fifo_in_the_model_directory_is_refused_not_read(case, capsys):
    os.mkfifo(case["model"] / "extra.safetensors")  # opening it would block forever
    err = refused(["run", *small(case)], capsys)
    assert err.endswith("extra.safetensors is not a regular file")


def test_a_hugging_face_cache_snapshot_links_inside_and_is_copied_as_files(tiny_llama, tmp_path):
    """HF's cache keeps every file of snapshots/REV as a link to ../../blobs/SHA: accepted, and the
    export holds the files' bytes, never a link."""
    repo = tmp_path / "models--org--tiny"
    snapshot_dir, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    sources = {p.name: p.read_bytes() for p in tiny_llama.iterdir()}
    sources["chat_template.jinja"] = b"{% for m in messages %}{{ m.content }}{% endfor %}"
    for name, data in sources.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snapshot_dir / name).symlink_to(Path("../../blobs") / digest)
    check_contained(snapshot_dir)
    side = open_checkpoint(snapshot_dir).tokenizer_files()
    assert set(side) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"}
    out = tmp_path / "out"
    with StreamingExport(out, [TensorSpec("w", (2,), torch.float32)], 1000) as ex:
        ex.write("w", torch.zeros(2))
        ex.finish({"model_type": "llama"}, side, {"pruned_tensors": ["w"]})
    for name in side:
        assert not (out / name).is_symlink() and (out / name).read_bytes() == sources[name], name
    verify_export(out)


BROKEN = {  # side file -> (content, what the one line says)
    "tokenizer.json": (b'{"model": ', "is not valid JSON (line 1"),
    "tokenizer_config.json": (b"[]", "must hold a JSON object, not list"),
    "generation_config.json": (b'{"a": "\xff"}', "is not UTF-8 text (byte 7)"),
    "special_tokens_map.json": (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
    "vocab.json": (b"{'single': 'quotes'}", "is not valid JSON"),
    "merges.txt": (b"#version: 0.2\n\xc3(", "is not UTF-8 text"),
    "chat_template.jinja": (b"{% for m in messages %}{{ m }}", "is not a valid Jinja template (line 1"),
    "tokenizer_config.json ": (json.dumps({"chat_template": "{{ messages[0 }}"}).encode(),
                               "its chat_template is not a valid Jinja template"),
    "tokenizer_config.json  ": (json.dumps({"chat_template": [{"name": "tool_use", "template": 7}]}).encode(),
                                "its chat_template is not a Jinja template (a int)"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_side_file_is_parsed_before_it_is_copied(name, case, capsys):
    content, expected = BROKEN[name]
    path = case["model"] / name.strip()
    path.write_bytes(content)
    err = refused(["run", *small(case)], capsys)
    assert err.startswith(f"dist-prune: error: side file {path}") and expected in err, err
    assert_nothing_left(case["root"])


def test_side_file_parser_fuzz(tmp_path):
    """Random byte edits of each kind of side file: every outcome is the file's exact bytes (it
    parsed) or a one-line UserError; nothing else escapes."""
    bases = {"tokenizer_config.json": json.dumps({"eos_token": "<eos>", "chat_template": "{% for m in messages %}"
                                                  "{{ m['role'] }}: {{ m.content }}{% endfor %}"}).encode(),
             "generation_config.json": json.dumps({"eos_token_id": 0, "temperature": 0.7}).encode(),
             "chat_template.jinja": b"{% if x %}{{ x | upper }}{% else %}{% raw %}y{% endraw %}{% endif %}",
             "merges.txt": "#version: 0.2\n\u0120 t\nh e\n".encode()}
    rng = random.Random(21)
    outcomes = {"parsed": 0, "refused": 0}
    for i in range(400):
        name = rng.choice(list(bases))
        data = bytearray(bases[name])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            op = rng.choice(["flip", "insert", "delete", "truncate"])
            if op == "flip" and at < len(data):
                data[at] = rng.randrange(256)
            elif op == "insert":
                data[at:at] = bytes([rng.choice(b'{}[]"%:,\\\xff\x00 ' + bytes([rng.randrange(256)]))])
            elif op == "delete":
                del data[at:at + rng.randint(1, 8)]
            elif op == "truncate":
                del data[at:]
        (tmp_path / str(i)).mkdir()
        path = tmp_path / str(i) / name  # the name decides the format checked
        path.write_bytes(bytes(data))
        try:
            assert read_side_file(path) == bytes(data)
            outcomes["parsed"] += 1
        except UserError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["parsed"] > 20 and outcomes["refused"] > 100, outcomes  # both kinds were exercised


def test_the_export_never_follows_a_link_it_is_given(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"token": SECRET}))
    link = tmp_path / "generation_config.json"
    link.symlink_to(secret)
    with StreamingExport(tmp_path / "out", [TensorSpec("w", (2,), torch.float32)], 1000) as ex:
        ex.write("w", torch.zeros(2))
        with pytest.raises(UserError, match="a symbolic link: side files are copied, never followed"):
            ex.finish({}, [link], {"pruned_tensors": ["w"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation_config.json", "secret.json"]


def test_register_refuses_an_export_holding_a_link(tmp_path, monkeypatch, capsys):
    """An export is verified before anything is logged: a link in it (here to a credentials file)
    is refused, and the registry is not even opened."""
    from test_registry import make_export

    monkeypatch.chdir(tmp_path)
    export_dir, _ = make_export(tmp_path, 0)
    (tmp_path / "netrc").write_text(f"machine example.com login me password {SECRET}")
    (export_dir / "tokenizer.json").unlink(missing_ok=True)
    (export_dir / "tokenizer.json").symlink_to(tmp_path / "netrc")
    err = refused(["register", str(export_dir), "--model-name", "x", "--tracking-uri",
                   f"sqlite:///{tmp_path}/mlflow.db"], capsys)
    assert f"export {export_dir}: tokenizer.json is a symbolic link to {tmp_path / 'netrc'}" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
