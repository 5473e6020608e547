"""Every export format from the worker on 2 gloo ranks: the compressed formats' shard headers come
from non-zero counts all-reduced from the ZeRO-3 slices (in the export dtype, after a structural
plan's shrinking), and each compressed export decompresses to the dense export of the same job,
byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dist_prune.config import load_config, to_dict
from dist_prune.io.decompress import decompress_export
from dist_prune.io.formats import stored_nonzero
from dist_prune.io.shards import read_header
from dist_prune.io.verify import verify_export
from dist_prune.worker import WorkerJob, run_worker
from multirank import run_on_ranks

PLANTED = "model.layers.0.mlp.up_proj.weight"
CASES = {  # name -> (overrides, the formats to export it in besides dense)
    "unstructured-50": (["prune.sparsity=0.5"], ["sparse-bitmask"]),
    # the planted group survives 2:4 in float32 and is +0.0 (not stored) in float16
    "2:4-float16": (["prune.structure=2:4", "export.dtype=float16"], ["sparse-bitmask", "sparse-24-bitmask"]),
    "channels": (["prune.structure=channels", "prune.sparsity=0.25"], ["sparse-bitmask"]),  # shrunk tensors
    "layers": (["prune.structure=layers", "prune.sparsity=0.5"], ["sparse-bitmask"]),  # renamed tensors
}


def _run_cases(model_dir: str, out_dir: str) -> None:
    for name, (overrides, formats) in CASES.items():
        for fmt in ["dense", *formats]:
            cfg = load_config(None, [f"model.path={model_dir}", "prune.method=magnitude", *overrides,
                                     f"export.format={fmt}", "export.max_shard_size=100KB"])
            run_worker(WorkerJob(to_dict(cfg), model_dir, None, None, f"{out_dir}/{name}-{fmt}",
                                 {"method": "magnitude", "structure": cfg.prune.structure}))


@pytest.fixture(scope="module")
def exports(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    model = root / "model"
    shutil.copytree(tiny_llama, model)
    weights = load_file(model / "model.safetensors")
    # one group of 4 whose 2 largest are non-zero in float32 but round to +0.0 in float16 (its
    # smallest subnormal is 6e-8): a count taken before the cast would size the header wrong
    weights[PLANTED][0, :4] = torch.tensor([1e-9, 2e-9, 3e-10, 4e-10])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    run_on_ranks(_run_cases, 2, str(model), str(root))
    return root


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(directory.glob("model*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_exports_decompress_to_the_dense_export_of_the_job(exports, case, tmp_path):
    dense = exports / f"{case}-dense"
    for fmt in CASES[case][1]:
        compressed = exports / f"{case}-{fmt}"
        meta = verify_export(compressed)
        assert meta["format"] == fmt and not (compressed / "config.json").exists()
        headers = [read_header(p) for p in sorted(compressed.glob("compressed*.safetensors"))]
        assert len(headers) == len(verify_export(dense)["shards"]) > 1
        back = decompress_export(compressed, tmp_path / f"{case}-{fmt}")
        assert files(back) == files(dense)
        if fmt == "sparse-bitmask":  # the stored values of each weight: its non-zero bit patterns
            stored = {n: h.spec(n).shape[0] for h in headers for n in h.tensors if n.endswith(".compressed")}
            dense_weights = weights(dense)
            assert stored == {k.removesuffix("weight") + "compressed": stored_nonzero(dense_weights[k])
                              for k in meta["tensors"] if meta["tensors"][k]["pruned"]}
    loaded = AutoModelForCausalLM.from_pretrained(back).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(dense).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_the_planted_group_is_zero_in_float16(exports):
    assert weights(exports / "2:4-float16-dense")[PLANTED][0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert weights(exports / "2:4-float16-dense")[PLANTED].dtype == torch.float16


@pytest.mark.parametrize("kind, name, shape", [
    ("channels", "model.layers.1.mlp.down_proj.weight", (64, 96)),  # columns go
    ("channels", "model.layers.0.mlp.up_proj.weight", (96, 64)),    # rows go
    ("heads", "model.layers.1.self_attn.o_proj.weight", (64, 64)),
    ("heads", "model.layers.0.self_attn.k_proj.weight", (32, 64)),
])
def test_kept_elements_of_a_slice_are_what_shrink_keeps(kind, name, shape):
    """A rank counts the non-zeros of its slice that the shrunk export keeps: the elements of
    [start, stop) that `shrink` keeps, for any slice boundaries."""
    from dist_prune.structural import Geometry, ShrinkPlan

    geometry = Geometry(layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96)
    groups = {"channels": 96, "heads": 2}[kind]
    removed = torch.zeros(2, groups, dtype=torch.bool)
    removed[:, [1, groups - 1]] = True
    plan = ShrinkPlan(kind, geometry, removed)
    index = torch.arange(shape[0] * shape[1]).reshape(shape)
    kept = set(plan.shrink(name, index).reshape(-1).tolist())
    assert 0 < len(kept) < index.numel()
    n = index.numel()
    for start, stop in ((0, n), (0, n // 3), (n // 3, n // 2 + 7), (n // 2 + 7, n)):
        mask = plan.kept_elements(name, shape, start, stop)
        assert set(torch.arange(start, stop)[mask].tolist()) == {i for i in kept if start <= i < stop}
    assert plan.kept_elements("model.layers.0.input_layernorm.weight", (64,), 0, 64) is None


def test_the_registry_recount_holds_for_every_case_and_format(exports):
    """What a job writes, every structure (a float16 2:4, shrunk channels, dropped layers) in every
    format, bears out each claim the registry recounts (dist_prune/registry/recount.py)."""
    from dist_prune.registry.recount import verify_claims

    for name, (_, formats) in CASES.items():
        for fmt in ["dense", *formats]:
            meta = verify_claims(exports / f"{name}-{fmt}")
            assert meta["format"] == fmt and meta["pruned_counts"]
