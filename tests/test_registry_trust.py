"""The registry trusts nothing (issue 21, class 4): every claim of sparsity.json is recounted on the
tensors, the shapes against config.json, no file of an export leaves its directory, and names and
aliases are MLflow's to judge; nothing is created in the registry until all of it has been checked.
Most cases call `verify_claims` (what registration runs first) on forged exports, without MLflow."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from dist_prune.cli import main
from dist_prune.errors import UserError
from dist_prune.io.formats import FORMATS, stored_nonzero
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import TensorSpec, sha256_file
from dist_prune.registry.names import check_alias, check_model_name
from dist_prune.registry.recount import verify_claims
from test_registry import make_export, tiny_model, tokenizer_files, write_export


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict:
    """Exports whose claims hold: 50% unstructured, 2:4, block:4x4, whole channels removed, one
    without pruned counts (as older exports), a sparse-24-bitmask one; and the dense weights."""
    root = tmp_path_factory.mktemp("honest")
    out = {"unstructured": make_export(root, 20)[0], "old": make_export(root, 21, pruned_counts=False)[0]}
    model, sd, pruned = tiny_model(20, vocab_size=260)
    config = model.config.to_dict()
    out["dense"] = write_export(root / "dense", config, sd, {"structure": "unstructured", "pruned_tensors": pruned})
    for structure, mask_of in (("2:4", _two_of_four), ("block:4x4", _blocks)):
        masked = {k: v.clone() for k, v in sd.items()}
        counts = {}
        for k in pruned:
            mask = mask_of(masked[k])
            masked[k][mask] = 0
            counts[k] = int(mask.sum())
        report = {"structure": structure, "pruned_tensors": pruned, "pruned_counts": counts}
        out[structure] = write_export(root / structure.replace(":", "-"), config, masked, report)
        if structure == "2:4":
            out["sparse-24-bitmask"] = _compressed(root / "sparse-24", config, masked, report)
    out["channels"] = _channels_removed(root / "channels", config, sd)
    return out


def _two_of_four(w: torch.Tensor) -> torch.Tensor:
    groups = w.abs().view(w.shape[0], -1, 4)
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.argsort(2)[..., :2], True).view(w.shape)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    score = w.abs().view(rows // 4, 4, cols // 4, 4).sum((1, 3))
    chosen = score <= score.median()
    return chosen.repeat_interleave(4, 0).repeat_interleave(4, 1)


def _compressed(directory: Path, config: dict, sd: dict, report: dict) -> Path:
    fmt = FORMATS["sparse-24-bitmask"]
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    nonzero = {k: stored_nonzero(sd[k]) for k in report["pruned_tensors"]}
    with StreamingExport(directory, specs, 20_000, fmt, report["pruned_tensors"], nonzero) as ex:
        for k, v in sd.items():
            ex.write(k, v)
        return ex.finish(config, tokenizer_files(directory.parent), report)


def _channels_removed(directory: Path, config: dict, sd: dict) -> Path:
    """16 of the 64 MLP channels of every layer cut out, config.json's intermediate_size with them."""
    keep = torch.arange(16, 64)
    shrunk, removed = dict(sd), {}
    for k, v in sd.items():
        if ".mlp." in k:
            shrunk[k] = v[:, keep].contiguous() if "down_proj" in k else v[keep].contiguous()
            removed[k] = v.numel() - shrunk[k].numel()
    after = sum(v.numel() for v in shrunk.values())
    report = {"structure": "channels", "pruned_tensors": sorted(removed), "removed_elements": removed,
              "structural": {"unit": "channels", "parameters_after": after}}
    return write_export(directory, {**config, "intermediate_size": 48}, shrunk, report)


@pytest.mark.parametrize("kind", ["unstructured", "old", "dense", "2:4", "block:4x4", "sparse-24-bitmask", "channels"])
def test_true_claims_are_accepted(honest, kind):
    meta = verify_claims(honest[kind])
    assert meta["overall_sparsity"] == (0.0 if kind == "dense" else pytest.approx(0.5, abs=0.02)
                                        if kind != "channels" else pytest.approx(0.25))


# -- forged manifests: self-consistent files, false claims ----------------------------------------

def _forge(honest: dict, tmp_path: Path, edit, base: str = "unstructured") -> Path:
    """A copy of an honest export whose sparsity.json (and files) `edit(directory, manifest)` changed."""
    directory = tmp_path / f"forged-{base.replace(':', '-')}"
    shutil.copytree(honest[base], directory, symlinks=True)
    meta = json.loads((directory / "sparsity.json").read_text())
    edit(directory, meta)
    (directory / "sparsity.json").write_text(json.dumps(meta))
    return directory


PRUNED = "model.layers.0.mlp.up_proj.weight"  # [64, 32]


def _claim_half_of_dense(honest):
    """The dense weights (their shards' sha256 are their own) under the 50% export's claims."""
    half = json.loads((honest["unstructured"] / "sparsity.json").read_text())

    def edit(directory, meta):
        for key in ("tensors", "overall_sparsity", "pruned_counts", "pruned_tensors"):
            meta[key] = half.get(key)
    return edit


def _config(**changes):
    def edit(directory, meta):
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _set(path: tuple, value):
    def edit(directory, meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return edit


def _shard_elsewhere(how: str):
    """A listed shard that lies outside the export: named by '..' or an absolute path, or a link."""
    def edit(directory, meta):
        name = sorted(meta["shards"])[0]
        outside = directory.parent / f"outside-{how}"
        outside.mkdir()
        shutil.copy(directory / name, outside / name)
        if how == "symlink":
            (directory / name).unlink()
            (directory / name).symlink_to(outside / name)
            return
        ref = f"../{outside.name}/{name}" if how == "dotdot" else str(outside / name)
        meta["shards"] = {ref if k == name else k: v for k, v in meta["shards"].items()}
        index = directory / "model.safetensors.index.json"
        text = index.read_text().replace(f'"{name}"', json.dumps(ref))
        index.write_text(text)
    return edit


def _side_file_link(directory, meta):
    secret = directory.parent / "credentials"
    secret.write_text("aws_secret_access_key = planted")
    (directory / "tokenizer_config.json").unlink()
    (directory / "tokenizer_config.json").symlink_to(secret)


def _plant_nan(directory, meta):
    """A NaN in place of one non-zero weight, the shard's sha256 recomputed: a diverged model whose
    every other claim is true."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = sorted(meta["shards"])[0]
    with safe_open(str(directory / name), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    weight = tensors[PRUNED] if PRUNED in tensors else next(t for t in tensors.values() if t.is_floating_point())
    weight.view(-1)[int(weight.view(-1).nonzero()[0])] = float("nan")
    save_file(tensors, str(directory / name), metadata=header)
    meta["shards"][name] = sha256_file(directory / name)


FORGERIES = {
    "dense weights claimed 50% sparse": (None, r"claims \{'shape'.*'zeros': \d+\} for model\.layers\..*, the shards hold"),
    "overall sparsity inflated": (_set(("overall_sparsity",), 0.9), "claims overall_sparsity 0.9, the shards hold 0.5"),
    "a tensor's sparsity inflated": (_set(("tensors", PRUNED, "sparsity"), 0.9), f"claims sparsity 0.9 for {PRUNED}"),
    "zeros off by one": (_set(("tensors", PRUNED, "zeros"), lambda z: z + 1), f"for {PRUNED}, the shards hold"),
    "shape transposed": (_set(("tensors", PRUNED, "shape"), [32, 64]), f"for {PRUNED}, the shards hold"),
    "2:4 claimed over unstructured zeros": (
        _set(("structure",), "2:4"), r"claims 512 pruned elements of model\.layers\.0\.self_attn\.q_proj\.weight as "
                                     r"2:4, but its zeros allow at most \d+ in that pattern"),
    "blocks claimed over unstructured zeros": (
        _set(("structure",), "block:4x4"), "pruned elements of .* as block:4x4, but its zeros allow at most"),
    "more pruned than zeros": (_set(("pruned_counts", PRUNED), 2048), "but its zeros allow at most 1024"),
    "a count for an unpruned tensor": (_set(("pruned_counts",), lambda c: {**c, "model.norm.weight": 1}),
                                       "counts pruned elements of model.norm.weight, which it does not list"),
    "a structure the tensors cannot have": (_set(("structure",), "3:5"), "cannot be: .*divisible by m=5"),
    "config.json: a wider MLP": (_config(intermediate_size=96), "config.json disagrees with the shards in 6 tensors"),
    "config.json: one layer more": (_config(num_hidden_layers=3), "config.json disagrees with the shards in 9 tensors"),
    "config.json: another architecture": (_config(model_type="gpt2"), "config.json disagrees with the shards"),
    "config.json: remote code": (_config(auto_map={"AutoModelForCausalLM": "x.Y"}), "no auto_map code is run"),
    "a shard named by '..'": (_shard_elsewhere("dotdot"), "lists shard '../outside-dotdot/.*': shard names are file names"),
    "a shard named by an absolute path": (_shard_elsewhere("absolute"), "lists shard '/.*': shard names are file names"),
    "a shard that links out": (_shard_elsewhere("symlink"), "model-00001-of-.* is a symbolic link to .*, outside"),
    "a NaN, its shard's sha256 recomputed": (_plant_nan, r"tensor model\..* holds 1 NaN or Inf values: a model "
                                                         r"that cannot be used is not registered"),
    "a side file that links out": (_side_file_link, r"export .*: tokenizer_config\.json is a symbolic link to .*credentials, outside"),
}


@pytest.mark.parametrize("case", FORGERIES)
def test_false_claims_are_refused(honest, tmp_path, case):
    edit, expected = FORGERIES[case]
    base = "dense" if edit is None else "unstructured"
    directory = _forge(honest, tmp_path, edit or _claim_half_of_dense(honest), base)
    with pytest.raises(UserError, match=expected):
        verify_claims(directory)


def test_false_claims_of_a_compressed_export_are_refused(honest, tmp_path):
    directory = _forge(honest, tmp_path, _set(("tensors", PRUNED, "zeros"), lambda z: z - 2), "sparse-24-bitmask")
    with pytest.raises(UserError, match=f"for {PRUNED}, the shards hold"):
        verify_claims(directory)


def test_random_edits_of_numeric_claims_are_refused(honest, tmp_path):
    """The class, fuzzed: 24 random changes of one number the manifest claims (a tensor's zeros,
    element count, sparsity or a dimension; the overall sparsity; a pruned count), each refused."""
    rng = random.Random(21)
    base = json.loads((honest["unstructured"] / "sparsity.json").read_text())
    names = sorted(base["tensors"])
    for trial in range(24):
        name = rng.choice(names)
        field = rng.choice(["zeros", "numel", "sparsity", "shape", "overall", "count"])
        delta = rng.choice([-3, -1, 1, 2, 1000])

        def edit(directory, meta, name=name, field=field, delta=delta):
            entry = meta["tensors"][name]
            if field == "shape":
                entry["shape"][rng.randrange(len(entry["shape"]))] += delta
            elif field == "overall":
                meta["overall_sparsity"] += delta / 1000
            elif field == "count":
                pruned = sorted(meta["pruned_counts"])
                meta["pruned_counts"][pruned[trial % len(pruned)]] += abs(delta) + 1024
            elif field == "sparsity":
                entry["sparsity"] += delta / 1000
            else:
                entry[field] += delta

        directory = _forge(honest, tmp_path / str(trial), edit)
        with pytest.raises(UserError):
            verify_claims(directory)


# -- names and aliases: MLflow's rules, before anything is created ---------------------------------

ALIASES = ["candidate", "prod_1", "a-b", "Ünïcode", "x" * 255, "x" * 256, "has space", "dot.ted", "sl/ash", "",
           "v1", "V22", "v", "vx1", "v1x", "latest", "LATEST", "Latest", "latest2"]
NAMES = ["tiny", "a-b.c", "has space", "a/b", "a:b", ".", "..", "..x", "x..y", " ", "", "m-1", "@", "Ünï"]


def test_our_name_rules_are_mlflows():
    """MLflow's own validators (3.17) accept exactly the names and aliases ours accept; one
    stricter case: MLflow's ^[\\w\\-]*$ matches an alias with a trailing newline, ours does not."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (_validate_model_alias_name, _validate_model_alias_name_reserved,
                                         _validate_model_name)

    def accepts(*checks) -> bool:
        try:
            for check in checks:
                check()
        except (MlflowException, UserError):
            return False
        return True

    for alias in ALIASES:
        theirs = accepts(lambda: _validate_model_alias_name(alias), lambda: _validate_model_alias_name_reserved(alias))
        assert accepts(lambda: check_alias(alias)) == theirs, alias
    for name in NAMES:
        assert accepts(lambda: check_model_name(name)) == accepts(lambda: _validate_model_name(name)), name
    assert accepts(lambda: _validate_model_alias_name("cand\n")) and not accepts(lambda: check_alias("cand\n"))


@pytest.mark.parametrize("argv, expected", [
    (["--alias", "v1"], "--alias 'v1' is reserved: MLflow keeps v<N> for version N (MLflow's rule for aliases)"),
    (["--alias", "latest"], "--alias 'latest' is reserved: models:/NAME/latest is the newest version"),
    (["--alias", "has space"], "--alias 'has space' may only hold letters, digits, '_' and '-', at least one"),
    (["--model-name", "team/model"], "--model-name 'team/model' must not contain '/' or ':'"),
    ([], "claims {'shape'"),  # the dense weights under the claims of a 50% export
])
def test_register_creates_nothing_until_all_is_checked(argv, expected, honest, tmp_path, capsys):
    """`dist-prune register` refuses in one line, and the tracking store is not even opened: no
    database, no run, no version."""
    forged = _forge(honest, tmp_path, _claim_half_of_dense(honest), "dense") if not argv else honest["unstructured"]
    store = tmp_path / "store"
    store.mkdir()
    args = ["register", str(forged), "--model-name", "m", *argv, "--tracking-uri", f"sqlite:///{store}/mlflow.db"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-prune: error: ") and expected in lines[0], lines
    assert list(store.iterdir()) == []


def test_job_alias_is_checked_before_any_worker(capsys):
    """registry.alias="has space" fails as config, before Ray (it used to fail after pruning)."""
    assert main(["run", "registry.alias=has space"]) == 2
    assert capsys.readouterr().err.strip() == ("dist-prune: error: config: registry.alias 'has space' may only hold "
                                               "letters, digits, '_' and '-', at least one (MLflow's rule for aliases)")


def test_streaming_recount_reads_each_shard_once(honest, monkeypatch):
    """The recount is the hashing pass: verify_claims opens every shard's data once (the header
    check reads only its header), and never hashes a file on its own."""
    import dist_prune.io.verify as verify

    opened = []
    real_open = open

    def counting_open(path, mode="r", *a, **k):
        if str(path).endswith(".safetensors") and "b" in mode:
            opened.append(Path(path).name)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(verify, "sha256_file", lambda p: pytest.fail("a second pass over the shards"))
    meta = verify_claims(honest["unstructured"])
    shards = sorted(meta["shards"])
    assert sorted(opened) == sorted(shards * 2)  # its header once, its data once
    assert all(sha256_file(honest["unstructured"] / s) == meta["shards"][s] for s in shards)
