"""io/shards.py: the one safetensors header parser (checkpoint reading, verification and
decompression all use it) and the one shard writer (export and decompression)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_prune.errors import UserError
from dist_prune.io.shards import ShardWriter, TensorSpec, read_header, safetensors_header

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64),
           "c": torch.ones(3, dtype=torch.bfloat16), "d": torch.zeros(0, 4)}


def raw_file(path: Path, header: dict, data: bytes = b"") -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_header_of_a_file_safetensors_wrote(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(TENSORS)
    assert [header.tensors[n]["data_offsets"][0] for n in header.tensors] == sorted(
        header.tensors[n]["data_offsets"][0] for n in header.tensors)  # in the order of the data
    for name, t in TENSORS.items():
        assert header.spec(name) == TensorSpec(name, tuple(t.shape), t.dtype)
        assert torch.equal(header.tensor(name), t)
    assert torch.equal(header.read("a", 1, 2), TENSORS["a"][1])  # one row, by positioned read


def test_writer_writes_what_safetensors_reads_and_hashes_it(tmp_path):
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()]
    writer, digest_only = ShardWriter(tmp_path / "w.safetensors", specs), ShardWriter(None, specs)
    for t in TENSORS.values():
        writer.append(t)
        digest_only.append(t)
    digest = writer.close()
    raw = (tmp_path / "w.safetensors").read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest() == digest_only.close()
    assert raw.startswith(safetensors_header(specs))
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(n), t) for n, t in TENSORS.items())
    out_of_spec = ShardWriter(None, specs)
    with pytest.raises(RuntimeError, match=r"a: got \(3, 2\) torch.float32, the shard's header says \(2, 3\)"):
        out_of_spec.append(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="closed after 0 of its 4 tensors"):
        out_of_spec.close()


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD = {  # name -> (header, data bytes, what the one-line message says after the file's name)
    "no header": (None, b"", r" is truncated: 3 bytes, no safetensors header$"),
    "huge header": (None, struct.pack("<Q", 10**9), r" is not a readable safetensors file \(a header of 1000000000 bytes\)$"),
    "short header": (None, struct.pack("<Q", 500) + b"{}", r" is truncated: 10 bytes, its header alone needs 508$"),
    "not json": (None, struct.pack("<Q", 5) + b"{bad}", r" is not a readable safetensors file \(bad header: not JSON\)$"),
    "not an object": ([1, 2], b"", r"\(bad header: not a JSON object\)$"),
    "no offsets": ({"w": {"dtype": "F32", "shape": [2]}}, b"", r"\(bad header entry for w\)$"),
    "unknown dtype": ({"w": {**F32_2x2, "dtype": "F4"}}, bytes(16),
                      r"\(tensor w has dtype 'F4', unknown to safetensors' torch API\)$"),
    "size mismatch": ({"w": {**F32_2x2, "shape": [2, 3]}}, bytes(16),
                      r"\(tensor w: offsets \[0, 16\] do not hold a F32 \[2, 3\]\)$"),
    "negative": ({"w": {**F32_2x2, "data_offsets": [-16, 0]}}, bytes(16), r"offsets \[-16, 0\] do not hold"),
    "gap": ({"w": F32_2x2, "v": {**F32_2x2, "data_offsets": [20, 36]}}, bytes(36),
            r"\(tensor v starts at 20, where 16 was expected\)$"),
    "overlap": ({"w": F32_2x2, "v": {**F32_2x2, "data_offsets": [8, 24]}}, bytes(24),
                r"\(tensor v starts at 8, where 16 was expected\)$"),
    "truncated data": ({"w": F32_2x2}, bytes(12), r" is truncated: \d+ bytes, its header promises \d+$"),
    "padded data": ({"w": F32_2x2}, bytes(20), r" is padded: \d+ bytes, its header describes \d+$"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, case):
    header, data, message = BAD[case]
    path = tmp_path / "shard.safetensors"
    if header is None:
        path.write_bytes(data if data else b"abc")
    else:
        raw_file(path, header, data)
    if message.startswith(r"\("):
        message = r" is not a readable safetensors file " + message
    elif not message.startswith(" "):
        message = r" is not a readable safetensors file \(.*" + message
    with pytest.raises(UserError, match=r"^" + str(path).replace(".", r"\.") + message) as e:
        read_header(path)
    assert "\n" not in str(e.value)
