"""Malformed checkpoints (issue 21, classes 7 and 10): every damaged or foreign model directory is
one line naming the file and the problem, on the driver, before Ray starts; the safetensors header
and index parsers are fuzzed: whatever the bytes, a UserError or a valid parse."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_prune.cli import main
from dist_prune.errors import UserError
from dist_prune.io.shards import read_header, read_index

SHARD = "model.safetensors"
WEIGHT = "model.layers.0.mlp.up_proj.weight"  # a pruning target, [96, 64] in the tiny Llama


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header, data: bytes, length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


@pytest.fixture(scope="module")
def bad(tiny_llama, tmp_path_factory) -> Path:
    """One broken copy of the tiny Llama per case, built once for the module."""
    root = tmp_path_factory.mktemp("bad-checkpoints")
    (root / "text.txt").write_text("a few words of calibration text, repeated. " * 400)
    header, data = header_and_data(tiny_llama / SHARD)

    def variant(name: str, **files) -> Path:
        target = root / name
        shutil.copytree(tiny_llama, target)
        for file, content in files.items():
            path = target / file.replace("__", ".")
            if content is None:
                path.unlink()
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return target

    first = min(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else 1e18)[0]
    overlap = json.loads(json.dumps(header))
    overlap[first]["data_offsets"] = [8, overlap[first]["data_offsets"][1] + 8]
    listed_dtype = json.loads(json.dumps(header))
    listed_dtype[first]["dtype"] = ["F32"]
    # -- class 7: the safetensors header lies
    variant("length-past-end", model__safetensors=with_header(header, data, length=len(data) * 4))
    variant("length-huge", model__safetensors=with_header(header, data, length=2**63))
    variant("header-a-list", model__safetensors=with_header([1, 2], data))
    variant("header-not-json", model__safetensors=with_header(b"{'dtype': F32" + b" " * 3, data))
    variant("header-nested", model__safetensors=with_header(b"[" * 50_000 + b"]" * 50_000, data))
    variant("offsets-overlap", model__safetensors=with_header(overlap, data))
    variant("dtype-a-list", model__safetensors=with_header(listed_dtype, data))
    # -- the index lies
    names = {k: SHARD for k in header if k != "__metadata__"}

    def index(weight_map) -> str:
        return json.dumps({"metadata": {}, "weight_map": weight_map})

    variant("index-a-list", model__safetensors__index__json=json.dumps([names]))
    variant("weight-map-a-list", model__safetensors__index__json=index(list(names)))
    variant("index-names-missing-shard", model__safetensors__index__json=index(
        {**names, WEIGHT: "model-00002-of-00002.safetensors"}))
    variant("index-climbs-out", model__safetensors__index__json=index({**names, WEIGHT: f"../x/{SHARD}"}))
    variant("index-absolute", model__safetensors__index__json=index({**names, WEIGHT: f"/etc/{SHARD}"}))
    # -- config.json
    config = json.loads((tiny_llama / "config.json").read_text())
    variant("config-not-json", config__json="{\"model_type\": \"llama\",")
    variant("config-a-list", config__json="[\"llama\"]")
    variant("config-no-model-type", config__json=json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    variant("config-more-layers", config__json=json.dumps({**config, "num_hidden_layers": 3}))
    variant("config-fewer-layers", config__json=json.dumps({**config, "num_hidden_layers": 1}))
    variant("config-other-width", config__json=json.dumps({**config, "intermediate_size": 128}))
    # -- the tokenizer
    variant("no-tokenizer", tokenizer__json=None)
    variant("tokenizer-not-json", tokenizer__json="{\"version\": \"1.0\", \"model\": ")
    tokenizer = json.loads((tiny_llama / "tokenizer.json").read_text())
    variant("tokenizer-no-added-tokens", tokenizer__json=json.dumps({k: v for k, v in tokenizer.items()
                                                                    if k != "added_tokens"}))
    tokenizer["model"]["merges"] = [["zz", "qq"]]
    variant("tokenizer-merges-unknown-tokens", tokenizer__json=json.dumps(tokenizer))
    # -- weights in a dtype that cannot be scored as floats
    for name, dtype in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn), ("bool", torch.bool)):
        weights = load_file(tiny_llama / SHARD)
        weights[WEIGHT] = weights[WEIGHT].to(dtype)
        save_file(weights, variant(name) / SHARD, metadata={"format": "pt"})
    # -- GGUF
    (root / "text.gguf").write_text("not a gguf file at all\n")
    gguf = root / "tiny.gguf"
    write_tiny_gguf(gguf)
    (root / "truncated.gguf").write_bytes(gguf.read_bytes()[:-100])
    # -- class 10: an architecture the layer runner cannot run
    gpt2 = variant("gpt2", model__safetensors=None, config__json=None)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=257, n_positions=64)).save_pretrained(gpt2)
    # -- pull destinations through a file or a link
    (root / "a-file").write_text("x")
    (root / "a-link").symlink_to(root / "elsewhere")
    return root


def write_tiny_gguf(path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CASES = {  # model directory (or file) under the fixture's root -> what the one line must say
    "length-past-end": f"{SHARD} is truncated",
    "length-huge": f"{SHARD} is not a readable safetensors file (a header of {2**63} bytes)",
    "header-a-list": f"{SHARD} is not a readable safetensors file (bad header: not a JSON object)",
    "header-not-json": f"{SHARD} is not a readable safetensors file (bad header: not JSON)",
    "header-nested": f"{SHARD} is not a readable safetensors file (bad header: not JSON)",
    "offsets-overlap": f"{SHARD} is not a readable safetensors file (tensor ",
    "dtype-a-list": "has dtype ['F32'], unknown to safetensors' torch API",
    "index-a-list": "model.safetensors.index.json is not a valid safetensors index (no weight_map object",
    "weight-map-a-list": "model.safetensors.index.json is not a valid safetensors index (no weight_map object",
    "index-names-missing-shard": "model-00002-of-00002.safetensors: listed in the index but missing",
    "index-climbs-out": f"(tensor {WEIGHT} is placed in '../x/{SHARD}'; a shard must be a *.safetensors file name",
    "index-absolute": f"(tensor {WEIGHT} is placed in '/etc/{SHARD}'; a shard must be",
    "config-not-json": "config.json is not valid JSON",
    "config-a-list": "config.json is not a JSON object",
    "config-no-model-type": "config.json has no model_type",
    "config-more-layers": "config.json (llama) implies a tensor model.layers.2.",
    "config-fewer-layers": "tensor model.layers.1.",
    "config-other-width": f"tensor model.layers.0.mlp.gate_proj.weight in {SHARD} has shape [96, 64], "
                          "config.json implies [128, 64]",
    "no-tokenizer": "has no tokenizer: expected tokenizer.json or vocab.json with merges.txt",
    "tokenizer-not-json": "tokenizer.json is not valid JSON (line 1: Expecting value)",  # the side-file parse (io/model_files.py)
    "tokenizer-no-added-tokens": "the tokenizer cannot be loaded (KeyError: 'added_tokens')",
    "tokenizer-merges-unknown-tokens": "the tokenizer cannot be loaded (Exception: Token `zz` out of vocabulary",
    "int8": f"tensor {WEIGHT} in {SHARD} is I8; dist-prune scores and prunes weights stored as F32, BF16",
    "fp8": f"tensor {WEIGHT} in {SHARD} is F8_E4M3;",
    "bool": f"tensor {WEIGHT} in {SHARD} is BOOL;",
    "text.gguf": "text.gguf is not a GGUF file (it starts with b'not ', not b'GGUF')",
    "truncated.gguf": "truncated.gguf is truncated",
    "gpt2": "model_type 'gpt2' (GPT2LMHeadModel) is not supported: dist-prune runs a decoder whose layers "
            "are `.layers` followed by a final `.norm`, as in llama, mistral, qwen2, qwen3",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_line_before_ray(case, bad, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("DIST_PRUNE_CACHE", str(tmp_path / "cache"))  # a GGUF would be converted here
    text = bad / "text.txt"
    argv = ["run", f"model.path={bad / case}", f"data.calibration.path={text}", "data.calibration.seq_len=16",
            "data.calibration.num_samples=2", f"eval.path={text}", "eval.seq_len=16", "eval.num_windows=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-prune: error: ") and "\n" not in err and CASES[case] in err, err
    assert str(bad / case) in err  # the line names the file (or the directory that holds it)
    assert not ray.is_initialized()  # refused before Ray started
    assert list(tmp_path.iterdir()) == []  # no export, no run store, no conversion


@pytest.mark.parametrize("where, expected", [
    ("a-file/model", "destination {root}/a-file/model cannot be created: {root}/a-file is not a directory"),
    ("a-file/deeper/model", "destination {root}/a-file/deeper/model cannot be created: {root}/a-file is not a "
                            "directory"),
    ("a-link", "destination {root}/a-link is a symbolic link; name a new directory"),
])
@pytest.mark.parametrize("command", ["pull", "decompress"])
def test_destination_through_a_file_or_a_link(command, where, expected, bad, tmp_path, capsys):
    source = "models:/tiny@candidate" if command == "pull" else str(bad / "int8")
    extra = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"] if command == "pull" else []
    assert main([command, source, str(bad / where), *extra]) == 2
    assert capsys.readouterr().err.strip() == "dist-prune: error: " + expected.format(root=bad)
    assert list(tmp_path.iterdir()) == []  # refused before the registry was opened
    assert not (bad / "elsewhere").exists()


# -- fuzzing the parsers ----------------------------------------------------------------------------

def _random_json(rng: random.Random, depth: int = 0):
    """A JSON value of a random type, biased towards what a header or an index holds."""
    kinds = ["int", "big", "neg", "bool", "float", "str", "null", "list", "dict"]
    kind = rng.choice(kinds if depth < 3 else kinds[:7])
    return {"int": lambda: rng.randint(0, 300), "big": lambda: rng.choice([2**63, 2**64 + 1, 10**30]),
            "neg": lambda: -rng.randint(1, 9), "bool": lambda: rng.random() < 0.5, "float": lambda: 1.5,
            "str": lambda: rng.choice(["F32", "I8", "BF16", "x", "", "..", "model.safetensors"]),
            "null": lambda: None,
            "list": lambda: [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {rng.choice(["dtype", "shape", "data_offsets", "weight_map", "a.weight"]):
                             _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}}[kind]()


def _mutated_header(rng: random.Random, data_len: int) -> bytes:
    """A header that is mostly right: two F32 tensors tiling `data_len` bytes, then one lie."""
    a = rng.randint(0, data_len // 4) * 4
    header = {"__metadata__": {"format": "pt"},
              "a.weight": {"dtype": "F32", "shape": [a // 4], "data_offsets": [0, a]},
              "b.weight": {"dtype": "F32", "shape": [(data_len - a) // 4], "data_offsets": [a, data_len]}}
    lie = rng.randrange(8)  # 6 and 7: the truth
    entry = header[rng.choice(["a.weight", "b.weight"])]
    if lie == 0:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
    elif lie == 1:
        entry["shape"] = [rng.choice([0, 1, 3, -1, 2**62, 2**63, True]) for _ in range(rng.randint(0, 3))]
    elif lie == 2:
        entry["data_offsets"] = [rng.randint(-4, data_len + 8), rng.randint(-4, data_len + 8)]
    elif lie == 3:
        header[rng.choice(["__metadata__", "a.weight"])] = _random_json(rng)
    elif lie == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    body = json.dumps(header).encode()
    if lie == 5:  # cut or garble the JSON itself, or nest it deeper than json's recursion limit
        cut = rng.randrange(len(body))
        body = body[:cut] + bytes([rng.randrange(256)]) + body[cut + 1:] if rng.random() < 0.9 else b"[" * 5000
    return body


def parsed_or_refused(parse, path: Path):
    """parse(path), or None where it refused the file in one line naming it."""
    try:
        return parse(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return None


def test_fuzzed_safetensors_headers_are_user_errors_or_valid(tmp_path):
    """400 seeded files: random length fields, JSON types, shapes and offsets. Every outcome is a
    UserError, or a header that really describes the file."""
    rng = random.Random(21)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"valid": 0, "refused": 0}
    start = time.monotonic()
    for i in range(400):
        data_len = rng.randint(0, 16) * 4
        body = _mutated_header(rng, data_len) if i % 4 else json.dumps(_random_json(rng)).encode()
        length = len(body)
        if rng.random() < 0.15:  # the length field lies
            length = rng.choice([0, 1, len(body) - 1, len(body) + 1, 10**8, 2**64 - 1])
        tail = bytes(max(0, data_len + rng.choice([0, 0, 0, -4, 4])))  # or a file that is cut or padded
        path.write_bytes(struct.pack("<Q", length) + body + tail)
        parsed = parsed_or_refused(read_header, path)
        outcomes["valid" if parsed else "refused"] += 1
        if not parsed:
            continue
        # a valid parse: every tensor readable in its shape from inside the file
        for name in parsed.tensors:
            spec = parsed.spec(name)
            assert parsed.tensor(name).shape == torch.Size(spec.shape)
    assert outcomes["valid"] >= 30 and outcomes["refused"] >= 300, outcomes  # both sides exercised
    assert time.monotonic() - start < 5


def test_fuzzed_indexes_are_user_errors_or_valid(tmp_path):
    """300 seeded index files of random structure: a UserError, or a weight_map of plain
    *.safetensors names."""
    rng = random.Random(7)
    path = tmp_path / "model.safetensors.index.json"
    outcomes = {"valid": 0, "refused": 0}
    for i in range(300):
        bad_name = rng.random() < 0.5
        names = ["../model.safetensors", "/abs/model.safetensors", "sub/model.safetensors", "config.json",
                 "..\\model.safetensors", 3, None, [SHARD]] if bad_name else [SHARD, "model-00001-of-00002.safetensors"]
        weight_map = {f"t{j}": rng.choice(names) for j in range(rng.randint(0, 3))}
        document = rng.choice([{"weight_map": weight_map}, {"metadata": {}, "weight_map": weight_map},
                               {"weight_map": _random_json(rng)}, _random_json(rng)])
        raw = json.dumps(document).encode()
        if i % 10 == 0:
            raw = raw[:rng.randrange(len(raw) + 1)]
        path.write_bytes(raw)
        parsed = parsed_or_refused(read_index, path)
        outcomes["valid" if parsed else "refused"] += 1
        if not parsed:
            continue
        assert parsed and all(isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors")
                              and "/" not in v and "\\" not in v for k, v in parsed.items())
        assert all(Path(path.parent, v).parent == path.parent for v in parsed.values())
    assert outcomes["valid"] >= 20 and outcomes["refused"] >= 100, outcomes
