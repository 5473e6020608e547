"""Issue 21, class 6: no config file can exhaust the machine or say two things at once. YAML
aliases are sized on the node graph and refused beyond a bound, in milliseconds; recursive aliases
and duplicate keys (at any level) are refused; every refusal is one line naming the file and line."""

from __future__ import annotations

import random
import re
import time

import pytest
import yaml

from dist_prune.cli import main
from dist_prune.config import describe_keys, load_config, read_yaml
from dist_prune.config import _yaml as config_yaml
from dist_prune.errors import UserError


def laughs(depth: int, width: int) -> str:
    """A "billion laughs": level i is a list of `width` aliases of level i-1."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("depth, width", [(9, 9), (9, 10), (30, 2), (4, 40), (6, 10)])
def test_alias_bombs_fail_in_milliseconds(depth, width, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(laughs(depth, width))
    start = time.process_time()  # CPU time: the machine's other load does not count
    with pytest.raises(UserError) as raised:
        load_config(path)
    assert time.process_time() - start < 0.1
    message = str(raised.value)
    assert re.fullmatch(rf"config file {re.escape(str(path))} line \d+: aliases expand this node beyond "
                        r"1,000,000 nodes and characters; write the values out instead", message), message


def test_the_issues_bomb_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(laughs(9, 9))
    assert len(laughs(9, 9)) == 500  # the issue's was 420 bytes: 41 s and 2.5 GB before any key was checked
    start = time.process_time()  # CPU time: the machine's other load does not count
    assert main(["run", "bomb.yaml"]) == 2
    assert time.process_time() - start < 2  # imports included; the file alone: under 0.1 s, above
    err = capsys.readouterr().err.strip()
    assert err == ("dist-prune: error: config file bomb.yaml line 7: aliases expand this node beyond 1,000,000 "
                   "nodes and characters; write the values out instead")


@pytest.mark.parametrize("text, problem", [
    ("a: &a [1, *a]\n", "line 1: an alias refers to a node that contains it"),
    ("a: &a {b: *a}\n", "line 1: an alias refers to a node that contains it"),
    ("prune:\n  sparsity: 0.5\nprune:\n  method: magnitude\n", "line 3: duplicate key 'prune' (first at line 1)"),
    ("prune: {sparsity: 0.5, sparsity: 0.7}\n", "line 1: duplicate key 'sparsity' (first at line 1)"),
    ("finetune:\n  neftune:\n    alpha: 1\n    alpha: 2\n", "line 4: duplicate key 'alpha' (first at line 3)"),
    ("a: [1\n", "line 2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
])
def test_refused_yaml_names_the_file_and_line(text, problem, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        read_yaml(path)
    assert str(raised.value) == f"config file {path} {problem}"


@pytest.mark.parametrize("key", [key for key, _, _ in describe_keys()])
def test_a_duplicate_of_any_key_is_refused(key, tmp_path):
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{s}:" for i, s in enumerate(sections)]
    indent = "  " * len(sections)
    lines += [f"{indent}{leaf}: 1", f"{indent}{leaf}: 2"]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    n = len(sections) + 1
    with pytest.raises(UserError, match=re.escape(f"line {n + 1}: duplicate key '{leaf}' (first at line {n})")):
        load_config(path)


def test_aliases_within_the_bound_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {sparsity: 0.3, method: wanda}\nprune:\n  <<: *b\n  sparsity: 0.6\n"
                    + laughs(4, 30))  # 30**4 = 810,000 nodes of 4: refused; 3 levels are fine
    with pytest.raises(UserError, match="line 9: aliases expand"):
        read_yaml(path)
    path.write_text("base: &b {sparsity: 0.3, method: wanda}\nprune:\n  <<: *b\n  sparsity: 0.6\n" + laughs(3, 30))
    raw = read_yaml(path)
    assert raw["prune"] == {"sparsity": 0.6, "method": "wanda"} and len(raw["a3"]) == 30


def test_alias_graph_fuzz():
    """Random documents of anchors and aliases: each is refused exactly when its tree, counted
    here independently on the loaded objects, exceeds the bound."""
    rng = random.Random(6)
    refused_count = 0
    for trial in range(60):
        lines, anchors = [], []
        for i in range(rng.randint(2, 12)):
            items = [f"*a{rng.choice(anchors[-2:])}" if anchors and rng.random() < 0.8 else f'"{"x" * rng.randint(0, 9)}"'
                     for _ in range(rng.randint(1, 14))]
            lines.append(f"k{i}: &a{i} [{', '.join(items)}]")
            anchors.append(i)
        text = "\n".join(lines)
        try:
            loaded = config_yaml.parse(text)
        except config_yaml.ConfigYAMLError:
            loaded = None
        plain = yaml.safe_load(text)  # PyYAML shares aliased lists: count with memo
        memo: dict[int, int] = {}

        def size(value) -> int:
            if isinstance(value, str):
                return 1 + len(value)
            if id(value) not in memo:
                memo[id(value)] = 1 + sum(size(v) for v in value)
            return memo[id(value)]

        total = 1 + sum(1 + len(k) + size(v) for k, v in plain.items())
        assert (loaded is None) == (total > config_yaml.MAX_EXPANDED), (trial, total)
        refused_count += loaded is None
    assert 10 < refused_count < 50, refused_count  # both outcomes were exercised


def test_a_huge_or_binary_config_file_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 30_000)
    with pytest.raises(UserError, match=r"is 300,000 bytes, over the 262,144 a config may have"):
        read_yaml(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"prune:\n  method: \xff\n")
    with pytest.raises(UserError, match=r"binary.yaml is not UTF-8 text \(byte 17\)"):
        read_yaml(binary)


def test_a_sweep_file_is_read_with_the_same_limits(tmp_path):
    from dist_prune.sweep import read_sweep_file

    path = tmp_path / "sweep.yaml"
    path.write_text("grid:\n  prune.sparsity: [0.3, 0.5]\ngrid:\n  prune.sparsity: [0.7]\n")
    with pytest.raises(UserError, match=re.escape(f"sweep file {path} line 3: duplicate key 'grid'")):
        read_sweep_file(path)
    path.write_text("grid:\n  prune.structure: [2:4, 4:8]\n")  # YAML 1.1 would read 2:4 as 124
    assert read_sweep_file(path)[1] == {"prune.structure": ["2:4", "4:8"]}
