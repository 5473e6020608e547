"""Streaming safetensors export: shard planning, HF loadability, atomicity, verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import INDEX_FILE, SINGLE_FILE, SPARSITY_FILE, TensorSpec, parse_size, plan_shards
from dist_prune.io.verify import verify_export


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def sparse_state_dict(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Zero the smallest half of every linear weight in the decoder layers."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pruned = [k for k in sd if ".layers." in k and k.endswith("_proj.weight")]
    for k in pruned:
        w = sd[k]
        thr = w.abs().flatten().kthvalue(w.numel() // 2).values
        w[w.abs() <= thr] = 0
    return sd, pruned


def export(sd, out: Path, max_shard_size: int, model=None, pruned=(), extra=(), overwrite=False) -> Path:
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    config = model.config.to_dict() if model is not None else {"model_type": "llama"}
    with StreamingExport(out, specs, max_shard_size, overwrite=overwrite) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        return ex.finish(config, list(extra),
                         {"method": "magnitude", "structure": "unstructured", "scope": "global",
                          "target_sparsity": 0.5, "pruned_tensors": list(pruned)})


def spec(name, n, dtype=torch.float32):
    return TensorSpec(name, (n,), dtype)


# -- plan_shards / parse_size ----------------------------------------------------------------

def test_plan_shards_edge_cases():
    a, b, c, d = spec("a", 10), spec("b", 10), spec("c", 100), spec("d", 5)  # 40, 40, 400, 20 bytes
    assert plan_shards([], 100) == []
    assert plan_shards([a, b, d], 1000) == [[a, b, d]]
    assert plan_shards([a, b, d], 80) == [[a, b], [d]]            # exactly at the limit stays together
    assert plan_shards([a, b, d], 79) == [[a], [b, d]]
    assert plan_shards([a, c, b, d], 100) == [[a], [c], [b, d]]   # oversize tensor alone, order kept
    assert plan_shards([c], 10) == [[c]]
    h, i = spec("h", 10, torch.bfloat16), spec("i", 10, torch.int64)  # 20 + 80 bytes: sizes use the dtype
    assert plan_shards([h, i], 100) == [[h, i]]
    assert plan_shards([h, i], 99) == [[h], [i]]
    with pytest.raises(ValueError):
        plan_shards([a], 0)
    for shard in plan_shards([a, b, c, d, a, b], 85):
        assert len(shard) == 1 or sum(s.nbytes for s in shard) <= 85


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("10 kib") == 10240
    assert parse_size(1000) == 1000
    assert parse_size("1000") == 1000
    for bad in ["", "GB", "2XB", "-1GB", "0", 0, -5, "1e9", "two GB", True, "1.2.3MB"]:
        with pytest.raises(UserError):
            parse_size(bad)


# -- round trip --------------------------------------------------------------------------------

def test_sharded_export_loads_in_transformers(tmp_path):
    model = tiny_llama()
    sd, pruned = sparse_state_dict(model)
    tok = tmp_path / "tokenizer_config.json"
    tok.write_text('{"model_max_length": 64}')
    out = export(sd, tmp_path / "out", 20_000, model, pruned, [tok])

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and SINGLE_FILE not in files
    assert {"config.json", INDEX_FILE, SPARSITY_FILE, "tokenizer_config.json"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp dir gone

    loaded = AutoModelForCausalLM.from_pretrained(out)
    lsd = loaded.state_dict()
    assert set(lsd) == set(sd)
    for k, v in sd.items():
        assert torch.equal(lsd[k], v), k

    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())

    meta = json.loads((out / SPARSITY_FILE).read_text())
    assert meta["producer"].startswith("dist-prune ") and meta["method"] == "magnitude"
    assert "pruned_tensors" not in meta
    for k, v in sd.items():
        t = meta["tensors"][k]
        assert t["zeros"] == int((v == 0).sum()) and t["numel"] == v.numel() and t["pruned"] == (k in pruned)
        assert t["shape"] == list(v.shape)
    expect = sum(int((sd[k] == 0).sum()) for k in pruned) / sum(sd[k].numel() for k in pruned)
    assert meta["overall_sparsity"] == pytest.approx(expect) and expect == pytest.approx(0.5, abs=0.01)
    for name in shards:
        assert meta["shards"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        with safe_open(out / name, framework="pt") as f:  # safetensors' own reader accepts it
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), sd[key])

    cfg = json.loads((out / "config.json").read_text())
    sc = cfg["sparsity_config"]
    assert sc["format"] == "dense" and sc["global_sparsity"] == pytest.approx(expect)
    assert "model.layers.0.mlp.up_proj" in sc["targets"] and "lm_head" in sc["ignore"]
    assert not set(sc["targets"]) & set(sc["ignore"])
    ct = pytest.importorskip("compressed_tensors.config")  # the reference parser accepts the block
    parsed = ct.SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert parsed.format == "dense" and parsed.targets == sc["targets"]
    assert verify_export(out)["overall_sparsity"] == meta["overall_sparsity"]


def test_single_shard_and_dtypes(tmp_path):
    sd = {"a.weight": torch.randn(3, 5).to(torch.bfloat16), "b.weight": torch.zeros(7, dtype=torch.float16),
          "c.idx": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d.mask": torch.tensor([True, False]),
          "e.scalar": torch.tensor(2.5), "f.empty": torch.zeros(0, 4)}
    out = export(sd, tmp_path / "one", 10**9, pruned=["a.weight", "b.weight"])
    assert (out / SINGLE_FILE).exists() and not (out / INDEX_FILE).exists()
    meta = verify_export(out)
    assert list(meta["shards"]) == [SINGLE_FILE]
    assert meta["tensors"]["b.weight"]["zeros"] == 7 and meta["tensors"]["d.mask"]["zeros"] == 1
    with safe_open(out / SINGLE_FILE, framework="pt") as f:
        for k, v in sd.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_write_checks_order_shape_dtype_and_completeness(tmp_path):
    specs = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (3,), torch.float32)]
    with StreamingExport(tmp_path / "x", specs, 100) as ex:
        with pytest.raises(ValueError, match="out of order"):
            ex.write("b", torch.zeros(3))
        with pytest.raises(ValueError, match="spec says"):
            ex.write("a", torch.zeros(4))
        with pytest.raises(ValueError, match="spec says"):
            ex.write("a", torch.zeros(2, 2, dtype=torch.float16))
        ex.write("a", torch.zeros(2, 2))
        with pytest.raises(ValueError, match="incomplete"):
            ex.finish({}, [], {})
    assert list(tmp_path.iterdir()) == []


# -- atomicity ---------------------------------------------------------------------------------

def test_exception_inside_with_leaves_nothing(tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(100), "c": torch.randn(100)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingExport(tmp_path / "out", specs, 500) as ex:
            ex.write("a", sd["a"])
            ex.write("b", sd["b"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    ex = StreamingExport(tmp_path / "out", specs, 500)
    ex.write("a", sd["a"])
    ex.abort()
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_dir_and_replaces_old_export(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a dist-prune export"):
        export({"a": torch.ones(3)}, foreign, 100)
    (foreign / SPARSITY_FILE).write_text('{"producer": "someone else"}')
    with pytest.raises(UserError):
        export({"a": torch.ones(3)}, foreign, 100)
    assert (foreign / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]

    out = tmp_path / "out"
    export({"a": torch.ones(3), "b": torch.ones(30)}, out, 100)  # two shards
    assert (out / INDEX_FILE).exists()
    with pytest.raises(UserError, match="set export.overwrite=true to replace it"):
        export({"a": torch.zeros(3)}, out, 100, pruned=["a"])
    assert verify_export(out)["tensors"]["a"]["zeros"] == 0
    export({"a": torch.zeros(3)}, out, 100, pruned=["a"], overwrite=True)  # replaces it with a single shard
    assert not (out / INDEX_FILE).exists() and not list(out.glob("model-*"))
    assert verify_export(out)["tensors"]["a"]["zeros"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no .old / .tmp left

    empty = tmp_path / "empty"
    empty.mkdir()
    export({"a": torch.ones(3)}, empty, 100)                      # an empty dir is fine
    assert verify_export(empty)


# -- verify_export ---------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path) -> Path:
    torch.manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(16, 16) for i in range(4)}
    return export(sd, tmp_path / "v", 1100, pruned=list(sd))


def test_verify_detects_flipped_byte(sharded):
    shard = sharded / "model-00002-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model-00002-of-00004.safetensors is corrupt"):
        verify_export(sharded)


def test_verify_detects_truncated_shard(sharded):
    shard = sharded / "model-00003-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(UserError, match="model-00003-of-00004.safetensors is truncated"):
        verify_export(sharded)


def test_verify_detects_missing_shard_and_bad_index(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"]["l0.weight"] = "model-00009-of-00009.safetensors"
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=INDEX_FILE):
        verify_export(sharded)
    (sharded / "model-00004-of-00004.safetensors").unlink()
    with pytest.raises(UserError, match="model-00004-of-00004.safetensors .*missing"):
        verify_export(sharded)
    (sharded / SPARSITY_FILE).unlink()
    with pytest.raises(UserError, match=SPARSITY_FILE):
        verify_export(sharded)
