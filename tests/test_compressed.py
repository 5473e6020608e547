"""Compressed exports (export.format sparse-bitmask / sparse-24-bitmask): our tensors against
compressed-tensors 0.12's own compressors, exact sizes, shards written once with headers known
up front, a layout no model loader takes for a model, and the way back to the dense export
(`decompress_export`, `dist-prune pull`, `dist-prune decompress`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor
from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskTensor
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import dist_prune.io.shards
from dist_prune.cli import main
from dist_prune.io.decompress import decompress_export
from dist_prune.config import load_config
from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.formats import FORMATS, stored_nonzero
from dist_prune.io.shards import SPARSITY_FILE, TensorSpec
from dist_prune.io.verify import verify_export
from dist_prune.registry import pull, register_export
from test_registry import tiny_model

SPARSE = ("sparse-bitmask", "sparse-24-bitmask")
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype])))


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest of every 4 consecutive inputs (masked_fill, as dist-prune does)."""
    groups = w.reshape(w.shape[0], -1, 4)
    smallest = groups.abs().topk(2, -1, largest=False).indices
    drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, smallest, True)
    return groups.masked_fill(drop, 0.0).reshape(w.shape)


def compress_tensor(name: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """{param: tensor}: the format's stored tensors of `w`, by their last name component."""
    return {k.rsplit(".", 1)[1]: v for k, v in FORMATS[fmt].encode(name, w).items()}


def decompress_tensor(name: str, parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    return FORMATS[fmt].decode(name, {f"{name.removesuffix('.weight')}.{k}": v for k, v in parts.items()})


# -- one tensor ------------------------------------------------------------------------------------

W = torch.tensor([[0.0, 1.5, 0.0, 0.0, -2.0, 0.0, 0.0, 3.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])


def test_known_answer_sparse_bitmask():
    parts = compress_tensor("m.weight", W, "sparse-bitmask")
    assert list(parts) == ["shape", "compressed", "bitmask", "row_offsets"]
    assert parts["shape"].tolist() == [2, 8] and parts["shape"].dtype == torch.int64
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0, 0.5]
    assert parts["bitmask"].tolist() == [[0b10010010], [0b10000000]] and parts["bitmask"].dtype == torch.uint8
    assert parts["row_offsets"].tolist() == [0, 3] and parts["row_offsets"].dtype == torch.int64
    library = BitmaskTensor.from_dense(W).dict("m", "cpu")
    assert all(torch.equal(parts[k], library[f"m.{k}"]) and parts[k].dtype == library[f"m.{k}"].dtype for k in parts)


def test_known_answer_sparse_24_bitmask():
    parts = compress_tensor("m.weight", W, "sparse-24-bitmask")
    assert list(parts) == ["shape", "compressed", "bitmask"]
    assert parts["shape"].tolist() == [[2], [8]] and parts["shape"].dtype == torch.int64
    # groups with fewer than 2 non-zeros are filled with their first zeros
    assert parts["compressed"].tolist() == [[0.0, 1.5, -2.0, 3.0], [0.0, 0.0, 0.0, 0.5]]
    assert parts["bitmask"].tolist() == [[0b10010011], [0b10010011]]
    library = Sparse24BitMaskTensor.from_dense(W).dict("m.weight", "cpu")
    assert set(library) == {f"m.{k}" for k in parts}
    assert torch.equal(parts["shape"], library["m.shape"])
    # compressed-tensors picks the filler zeros by topk, so only the decompressed tensor is comparable
    theirs = Sparse24BitMaskTensor.from_compressed_data(**{k: parts[k] for k in parts}).decompress()
    assert same_bits(theirs, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", SPARSE)
def test_round_trip_is_bit_identical(fmt, dtype):
    torch.manual_seed(1)
    w = prune_2_4(torch.randn(24, 36)).to(dtype)  # 36 columns: the last bitmask byte is partial
    w[0, 0:4] = torch.tensor([-0.0, 0.0, 0.0, 0.0])  # -0.0 is kept; an all-zero group is filled
    w[1, 0:4] = torch.tensor([float("nan"), 0.0, -0.0, 0.0])
    w[2, 4:8] = 0.0
    parts = compress_tensor("m.weight", w, fmt)
    assert parts["compressed"].dtype == dtype
    assert same_bits(decompress_tensor("m.weight", parts, fmt), w)
    library = (BitmaskTensor(**parts) if fmt == "sparse-bitmask"
               else Sparse24BitMaskTensor.from_compressed_data(**parts)).decompress()
    assert same_bits(library, w)


def test_2_4_violations_are_one_line_errors():
    w = prune_2_4(torch.randn(4, 8))
    w[3, 4:8] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    with pytest.raises(UserError) as e:
        compress_tensor("model.layers.0.mlp.up_proj.weight", w, "sparse-24-bitmask")
    assert str(e.value) == ("export.format sparse-24-bitmask needs 2:4 sparse weights, but model.layers.0."
                            "mlp.up_proj.weight has 3 non-zeros (a -0.0 counts) in row 3, columns 4-7")
    with pytest.raises(UserError, match=r"^export.format sparse-24-bitmask: m.weight has 6 input columns, "
                                        r"not a multiple of 4$"):
        compress_tensor("m.weight", torch.zeros(2, 6), "sparse-24-bitmask")
    compress_tensor("m.weight", w, "sparse-bitmask")  # any sparsity is fine for sparse-bitmask


@pytest.mark.parametrize("fmt", SPARSE)
def test_stored_specs_known_up_front_are_those_of_the_encoded_tensors(fmt):
    """A shard's header is written before its tensors: the specs from shape, dtype and non-zero
    count alone must be exactly what `encode` then produces."""
    torch.manual_seed(2)
    for rows, cols, dtype in ((24, 36, torch.float32), (7, 12, torch.bfloat16), (1, 4, torch.float16)):
        w = prune_2_4(torch.randn(rows, cols)).to(dtype)
        w[0, :4] = torch.tensor([-0.0, 0.0, 0.0, 0.0])  # a -0.0 is stored, so it counts
        nonzero = stored_nonzero(w)
        assert nonzero == int((w != 0).sum()) + 1
        assert nonzero == sum(stored_nonzero(part) for part in w.reshape(-1).split(5))  # slices add up
        spec = TensorSpec("m.weight", (rows, cols), dtype)
        encoded = FORMATS[fmt].encode("m.weight", w)
        assert FORMATS[fmt].stored_specs(spec, nonzero) == [TensorSpec(k, tuple(v.shape), v.dtype)
                                                            for k, v in encoded.items()]


def test_config_accepts_2_4_with_sparse_24_bitmask():
    cfg = load_config(None, ["export.format=sparse-24-bitmask", "prune.structure=2:4"], check_paths=False)
    assert cfg.export.format == "sparse-24-bitmask"


# -- whole exports -----------------------------------------------------------------------------------

def tiny_state_dict() -> tuple[LlamaForCausalLM, dict[str, torch.Tensor], list[str]]:
    model, sd, pruned = tiny_model(0)
    for k in pruned:
        sd[k] = prune_2_4(sd[k])
    sd[pruned[0]][0, :4] = torch.tensor([0.0, -0.0, 0.0, 0.0])
    return model, sd, pruned


def write_export(out: Path, model, sd: dict, pruned: list[str], fmt: str, shard_size: int,
                 extra: Path | None = None, structure: str = "2:4") -> Path:
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    nonzero = {k: stored_nonzero(v) for k, v in sd.items()}  # what the workers all-reduce from their slices
    with StreamingExport(out, specs, shard_size, FORMATS[fmt], pruned, nonzero) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        return ex.finish(model.config.to_dict(), [extra] if extra else [],
                         {"method": "magnitude", "structure": structure, "pruned_tensors": pruned})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    model, sd, pruned = tiny_state_dict()
    extra = root / "tokenizer.json"
    extra.write_text('{"not": "a real tokenizer"}')
    dirs = {(fmt, size): write_export(root / f"{fmt}-{size}", model, sd, pruned, fmt, size, extra)
            for fmt in ("dense", *SPARSE) for size in (20_000, 10**9)}
    return {"root": root, "model": model, "sd": sd, "pruned": pruned, "dirs": dirs}


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def shard_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("fmt", SPARSE)
def test_compressed_tensors_decompresses_our_shards_to_the_dense_weights(exports, fmt):
    """compressed-tensors 0.12 (the lock's; 0.15 removed these compressors) rebuilds every
    compressed weight of our shards, read with safetensors' own reader, bit for bit."""
    sd, pruned = exports["sd"], exports["pruned"]
    library = {"sparse-bitmask": BitmaskTensor, "sparse-24-bitmask": Sparse24BitMaskTensor.from_compressed_data}[fmt]
    for size in (20_000, 10**9):
        stored = shard_tensors(exports["dirs"][fmt, size])
        for name, dense in sd.items():
            if name not in pruned:
                assert same_bits(stored.pop(name), dense)
                continue
            module = name.removesuffix(".weight")
            params = ("shape", "compressed", "bitmask") + (("row_offsets",) if fmt == "sparse-bitmask" else ())
            assert same_bits(library(**{p: stored.pop(f"{module}.{p}") for p in params}).decompress(), dense)
        assert stored == {}


@pytest.mark.smoke  # make test-latest: the newest transformers must refuse it too
@pytest.mark.parametrize("fmt", SPARSE)
def test_no_loader_takes_a_compressed_export_for_a_model(exports, fmt):
    """Issue 20: with compressed-tensors >= 0.15, from_pretrained on the old layout (config.json with a
    sparse quantization_config, model*.safetensors) returned a model whose decoder linears were
    random, with no error; with the lock's 0.12.2 AutoConfig read it as a LlamaConfig. Now nothing
    in the directory is what a loader looks for, so every way in raises."""
    for size in (20_000, 10**9):
        directory = exports["dirs"][fmt, size]
        names = {p.name for p in directory.iterdir()}
        assert not names & {"config.json", "model.safetensors", "model.safetensors.index.json"}
        assert not [n for n in names if n.startswith("model")]
        # transformers 5.25: ValueError "Unrecognized model in DIR. Should have a `model_type` key in
        # its config.json"; 4.x: OSError "DIR does not appear to have a file named config.json"
        for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
            with pytest.raises((OSError, ValueError), match="config.json"):
                load(directory)
        # a model class named directly, or given its config, finds no weights it knows (5.25 reads a
        # missing config.json of LlamaConfig.from_pretrained as all defaults; no weights come of it)
        for load in (LlamaForCausalLM.from_pretrained,
                     lambda d: AutoModelForCausalLM.from_pretrained(d, config=exports["model"].config)):
            with pytest.raises(OSError, match="no file named model.safetensors"):
                load(directory)
        notice = (directory / "README.md").read_text()
        assert f"`{fmt}` export format" in notice and "dist-prune pull models:/NAME@ALIAS DIR" in notice
        assert "dist-prune decompress THIS_DIRECTORY DIR" in notice


def test_shards_are_written_once_and_never_read_back(exports, tmp_path, monkeypatch):
    """The headers come first from the non-zero counts: each file of the export is opened once,
    to write it, and no shard is opened for reading (the old export read its dense shards back)."""
    opened = []
    real_open = open

    def spy(path, mode="r", *args, **kwargs):
        opened.append((Path(path).name, mode))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(dist_prune.io.shards, "open", spy, raising=False)
    out = write_export(tmp_path / "once", exports["model"], exports["sd"], exports["pruned"],
                       "sparse-bitmask", 20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and all(name.startswith("compressed-") for name in shards)
    assert sorted(opened) == sorted([(name, "wb") for name in shards] + [(SPARSITY_FILE, "w"),
                                     ("config.compressed.json", "w"), ("compressed.safetensors.index.json", "w")])


@pytest.mark.parametrize("fmt", SPARSE)
def test_files_shrink_by_the_formula(exports, fmt):
    sd, pruned = exports["sd"], set(exports["pruned"])
    expected = 0
    for name, t in sd.items():
        if name not in pruned:
            expected += t.numel() * 4
            continue
        rows, cols = t.shape
        if fmt == "sparse-bitmask":  # shape + values with non-zero bits (-0.0 too) + bitmask + row_offsets
            expected += 2 * 8 + int((t.view(torch.int32) != 0).sum()) * 4 + rows * math.ceil(cols / 8) + rows * 8
        else:                        # shape + half the values + bitmask
            expected += 2 * 8 + rows * cols // 2 * 4 + rows * math.ceil(cols / 8)
    dense_total = sum(t.numel() * 4 for t in sd.values())
    assert expected < dense_total * 0.75
    for size in (20_000, 10**9):
        directory, dense = exports["dirs"][fmt, size], exports["dirs"]["dense", size]
        shards = sorted(directory.glob("compressed*.safetensors"))
        assert sum(data_bytes(p) for p in shards) == expected
        meta = verify_export(directory)
        assert meta["format"] == fmt and meta["total_size"] == dense_total and meta["format_version"] == 2
        assert meta["dense_shards"] == verify_export(dense)["shards"]
        if size == 20_000:
            assert len(shards) > 1
            index = json.loads((directory / "compressed.safetensors.index.json").read_text())
            assert index["metadata"]["total_size"] == expected
        else:
            assert [p.name for p in shards] == ["compressed.safetensors"]
        # the dense model's config.json, under a name no loader reads; no quantization_config
        assert (directory / "config.compressed.json").read_bytes() == (dense / "config.json").read_bytes()


@pytest.mark.parametrize("fmt", SPARSE)
def test_decompress_gives_the_dense_export_byte_for_byte(exports, fmt, tmp_path):
    for size in (20_000, 10**9):
        out = decompress_export(exports["dirs"][fmt, size], tmp_path / f"dense-{size}")
        assert files(out) == files(exports["dirs"]["dense", size])


def test_decompress_publishes_only_a_finished_directory(exports, tmp_path, monkeypatch):
    """The dense layout is written beside the destination and renamed into place: while it is
    being written, the destination does not exist."""
    import dist_prune.io.decompress as decompress

    seen = []
    real = decompress.write_json

    def spy(path, *args, **kwargs):
        seen.append((Path(path).parent.name, (tmp_path / "out").exists()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decompress, "write_json", spy)
    decompress_export(exports["dirs"]["sparse-bitmask", 20_000], tmp_path / "out")
    assert seen and all(parent.startswith(".out.tmp-") and not exists for parent, exists in seen)
    assert files(tmp_path / "out") == files(exports["dirs"]["dense", 20_000])
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_decompress_checks_the_dense_sha256(exports, tmp_path):
    src = tmp_path / "tampered"
    shutil.copytree(exports["dirs"]["sparse-bitmask", 10**9], src)
    shard = src / "compressed.safetensors"
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8:8 + n])["model.layers.1.mlp.up_proj.compressed"]["data_offsets"]
    raw[8 + n + begin] ^= 0x01  # one stored value changes, the bitmask stays consistent
    shard.write_bytes(raw)
    meta = json.loads((src / SPARSITY_FILE).read_text())
    from dist_prune.io.shards import sha256_file

    meta["shards"]["compressed.safetensors"] = sha256_file(shard)  # passes verify_export ...
    (src / SPARSITY_FILE).write_text(json.dumps(meta))
    verify_export(src)
    with pytest.raises(UserError, match="decompressed shard model.safetensors of .* does not match the dense sha256"):
        decompress_export(src, tmp_path / "out")  # ... but not the dense sha256
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # nor is a half-written directory left beside it
    meta["format"] = "zip"
    (src / SPARSITY_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="names export format 'zip', unknown to this dist-prune"):
        verify_export(src)


def test_non_2_4_weights_are_refused_and_nothing_is_published(exports, tmp_path):
    model, sd = exports["model"], dict(exports["sd"])
    name = exports["pruned"][3]
    sd[name] = sd[name].clone()
    sd[name][5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(UserError) as e:
        write_export(tmp_path / "out", model, sd, exports["pruned"], "sparse-24-bitmask", 10**9)
    assert str(e.value) == (f"export.format sparse-24-bitmask needs 2:4 sparse weights, but {name} has "
                            "3 non-zeros (a -0.0 counts) in row 5, columns 8-11")
    assert list(tmp_path.iterdir()) == []  # no export, no temporary directory


# -- registry -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(exports):
    root = exports["root"]
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's defaults (mlruns/) land here, not in the repo
        reg = register_export(exports["dirs"]["sparse-24-bitmask", 20_000], tracking_uri=uri,
                              experiment="compressed", model_name="tiny-24", alias="candidate",
                              params={}, metrics={}, artifact_location=(root / "artifacts").as_uri())
        yield {"uri": uri, "reg": reg}


def test_pull_decompresses_by_default(exports, registered, tmp_path, capsys):
    """compressed export -> register -> pull: the dense export of the same weights, which
    from_pretrained loads exactly; --keep-compressed gives the stored form, --decompress (the old
    opt-in) still works and is the default."""
    dst = tmp_path / "dense"
    assert main(["pull", "models:/tiny-24/1", str(dst), "--tracking-uri", registered["uri"]]) == 0
    assert capsys.readouterr().out.strip() == str(dst.absolute())
    assert files(dst) == files(exports["dirs"]["dense", 20_000])
    loaded = AutoModelForCausalLM.from_pretrained(dst).state_dict()
    assert set(loaded) == set(exports["sd"])
    assert all(same_bits(loaded[k], v) for k, v in exports["sd"].items())
    as_registered = pull("models:/tiny-24@candidate", tmp_path / "compressed", tracking_uri=registered["uri"],
                         keep_compressed=True)
    assert files(as_registered) == files(exports["dirs"]["sparse-24-bitmask", 20_000])
    assert main(["pull", "models:/tiny-24@candidate", str(tmp_path / "old-flag"), "--decompress",
                 "--tracking-uri", registered["uri"]]) == 0
    assert files(tmp_path / "old-flag") == files(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "dense", "old-flag"]  # no temporary left
    with pytest.raises(SystemExit):
        main(["pull", "models:/tiny-24/1", str(tmp_path / "x"), "--decompress", "--keep-compressed"])


def test_decompress_command(exports, tmp_path, capsys):
    src = exports["dirs"]["sparse-bitmask", 20_000]
    assert main(["decompress", str(src), str(tmp_path / "a" / "dense")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "dense")
    assert files(tmp_path / "a" / "dense") == files(exports["dirs"]["dense", 20_000])
    assert main(["decompress", str(src), str(tmp_path / "a" / "dense")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dist-prune: error: destination {tmp_path / 'a' / 'dense'} already exists"
    dense = exports["dirs"]["dense", 20_000]
    assert main(["decompress", str(dense), str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == (f"dist-prune: error: {dense} is a dense export: "
                                               "there is nothing to decompress")
    assert not (tmp_path / "b").exists()


def test_compressed_export_as_model_path_is_one_line(exports, tmp_path):
    """A compressed export holds bitmasks, not weights: a job refuses it before any worker starts."""
    from dist_prune.job import prepare

    directory = exports["dirs"][("sparse-bitmask", 20_000)]
    cfg = load_config(None, [f"model.path={directory}"], check_paths=False)
    with pytest.raises(UserError, match="is a sparse-bitmask export; decompress it first"):
        prepare(cfg)
