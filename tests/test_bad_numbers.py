"""Issue 21, class 3: no broken model gets registered. Every number key of the schema is checked
(floats finite and in their interval, ints in theirs and in 64 bits), non-finite exported tensors
are refused, and a job that would prune nothing is refused before Ray starts."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing

import pytest
import torch
from test_bad_security import case, refused  # noqa: F401 - `case` is a fixture
from test_bad_inputs import small

from dist_prune.config import JobConfig, load_config
from dist_prune.config._validate import check_ranges
from dist_prune.errors import UserError
from dist_prune.io.export import StreamingExport
from dist_prune.io.shards import count_non_finite
from dist_prune.io.formats import FORMATS, stored_nonzero
from dist_prune.io.shards import TensorSpec


def number_keys(cls=JobConfig, prefix: str = "") -> list[tuple[str, type, str | None, bool]]:
    """(key, int or float, its schema interval, whether it is a list) for every number key."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            rows += number_keys(kind, key + ".")
            continue
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
        listed = typing.get_origin(kind) is list
        kind = typing.get_args(kind)[0] if listed else kind
        if kind in (int, float):
            rows.append((key, kind, f.metadata.get("valid"), listed))
    return rows


KEYS = number_keys()
FLOATS = [k for k in KEYS if k[1] is float]
INTS = [k for k in KEYS if k[1] is int]


def override(key: str, value: str, listed: bool) -> str:
    return f"{key}=[{value}, 0.5]" if listed else f"{key}={value}"


def test_the_schema_declares_what_the_issue_names():
    names = {k[0] for k in FLOATS}
    assert {"finetune.lr", "finetune.neftune.alpha", "finetune.distill.temperature", "finetune.distill.beta",
            "prune.sparsity", "finetune.betas"} <= names
    assert {"data.calibration.seed", "seed", "cluster.num_workers"} <= {k[0] for k in INTS}
    for key, _, valid, _ in KEYS:  # an interval written otherwise would never be applied
        assert valid is None or re.fullmatch(r"[\[(]-?[\d.]+, (?:inf|-?[\d.]+)[\])]", valid), (key, valid)
    check_ranges(JobConfig())  # the defaults pass


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999", "-1e999"])
@pytest.mark.parametrize("key, kind, valid, listed", FLOATS, ids=[k[0] for k in FLOATS])
def test_every_float_key_must_be_finite(key, kind, valid, listed, value):
    with pytest.raises(UserError) as raised:
        load_config(None, [override(key, value, listed)])
    message = str(raised.value)
    assert message.startswith(f"config: {key}{'[0]' if listed else ''} must be a finite number") and "\n" not in message


def _outside(valid: str) -> list[float]:
    """Numbers just outside each finite end of an interval, and an open end itself."""
    low, high = (float(x) for x in valid[1:-1].split(", "))
    values = [low - 1, low - 1e-6] + ([low] if valid[0] == "(" else [])
    if math.isfinite(high):
        values += [high + 1, high * 1.000001 + 1e-6] + ([high] if valid[-1] == ")" else [])
    return values


RANGED = [(key, kind, valid, listed, value) for key, kind, valid, listed in KEYS if valid
          for value in _outside(valid) if kind is float or value == int(value)]


@pytest.mark.parametrize("key, kind, valid, listed, value", RANGED, ids=[f"{k[0]}={k[4]:g}" for k in RANGED])
def test_every_number_key_refuses_values_outside_its_interval(key, kind, valid, listed, value):
    text = str(int(value)) if kind is int else repr(value)
    with pytest.raises(UserError) as raised:
        load_config(None, [override(key, text, listed)])
    message = str(raised.value)
    assert message.startswith(f"config: {key}{'[0]' if listed else ''} must be ") and f"got {float(text) if kind is float else text}" in message, message


@pytest.mark.parametrize("value", [10**20, -(10**20), 2**63])
@pytest.mark.parametrize("key", [k[0] for k in INTS])
def test_every_int_key_is_range_checked(key, value):
    with pytest.raises(UserError) as raised:
        load_config(None, [f"{key}={value}"])
    message = str(raised.value)
    assert message.startswith(f"config: {key} must be ") and message.endswith(f"got {value}") and "\n" not in message


@pytest.mark.parametrize("argv, expected", [
    (["finetune.steps=5", "finetune.lr=1e999"], "config: finetune.lr must be a finite number in (0, 1], got inf"),
    (["finetune.steps=5", "finetune.neftune.alpha=.nan"], "config: finetune.neftune.alpha must be a finite number"),
    (["finetune.steps=5", "finetune.distill.beta=0.5", "finetune.distill.temperature=.inf"],
     "config: finetune.distill.temperature must be a finite number in (0, 100], got inf"),
    (["data.calibration.seed=100000000000000000000"],
     "config: data.calibration.seed must be in [0, 4294967295], got 100000000000000000000"),
    (["prune.exclude=['*']"], "prune.exclude ['*'] leaves no Linear weight of the model to prune"),
])
def test_the_issues_cases_through_the_cli(argv, expected, case, capsys):
    err = refused(["run", *small(case), *argv], capsys)
    assert expected in err
    assert sorted(p.name for p in case["root"].iterdir()) == ["data", "model", "outside"]


@pytest.mark.parametrize("exclude, left", [
    (["*"], 0), (["*weight*"], 0), (["model.*", "lm_head*"], 0),
    (["*proj*", "*lm_head*"], 0),  # embed_tokens is 2-D but no Linear: nothing a worker would prune
    (["*proj*"], 1),               # the output head alone
])
def test_a_job_that_would_prune_nothing_is_refused_before_ray(exclude, left, tiny_llama):
    from dist_prune.job import check_targets

    cfg = load_config(None, [f"model.path={tiny_llama}", f"prune.exclude={exclude}"])
    if left:
        check_targets(cfg, tiny_llama)
        return
    with pytest.raises(UserError, match=re.escape(f"prune.exclude {exclude} leaves no Linear weight")):
        check_targets(cfg, tiny_llama)


# -- non-finite tensors are never exported ------------------------------------------------------

@pytest.mark.parametrize("fmt", ["dense", "sparse-bitmask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_export_with_a_non_finite_value_is_refused(bad, dtype, fmt, tmp_path):
    good = torch.randn(8, 8).to(dtype)
    broken = good.clone()
    broken[0, 0] = broken[3, 5] = broken[7, 7] = bad  # first, middle, last
    specs = [TensorSpec("a.weight", (8, 8), dtype), TensorSpec("b.weight", (8, 8), dtype)]
    nonzero = {s.name: stored_nonzero(t) for s, t in zip(specs, (good, broken))}
    with StreamingExport(tmp_path / "out", specs, 10**6, FORMATS[fmt], [s.name for s in specs], nonzero) as ex:
        ex.write("a.weight", good)
        with pytest.raises(UserError) as raised:
            ex.write("b.weight", broken)
    assert str(raised.value) == ("the exported tensor b.weight holds 3 NaN or Inf values (of 64): nothing is "
                                 "exported or registered; did fine-tuning diverge (finetune.lr)?")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("at", [0, 6, 7, 8, 99])
def test_the_non_finite_scan_finds_a_value_in_any_chunk(at):
    tensor = torch.zeros(100)
    assert count_non_finite(tensor, chunk=7) == 0
    tensor[at] = float("nan")
    assert count_non_finite(tensor, chunk=7) == 1
    tensor[(at + 50) % 100] = float("-inf")
    assert count_non_finite(tensor, chunk=7) == 2
    assert count_non_finite(tensor.to(torch.float8_e5m2), chunk=7) == 2  # 1-byte floats: as float32
    assert count_non_finite(torch.arange(10)) == 0  # integer tensors hold no NaN
