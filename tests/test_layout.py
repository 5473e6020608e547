"""The package's shape, checked on its source: imports run one way, and no module outside
methods/ decides by a method's name (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_prune"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def _import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in it; importing a submodule also runs
    every package __init__ above it."""
    graph = {}
    for name, tree in modules.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dist_prune"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("dist_prune")]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                deps |= {p for k in range(2, len(parts) + 1) if (p := ".".join(parts[:k])) in modules}
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, found = {}, [], []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_no_import_cycle():
    assert _cycles(_import_graph(_modules())) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def _compares_with(node: ast.Compare, names) -> bool:
    """Whether the comparison has one of `names` as a string constant, alone or in a literal tuple,
    list or set (`x == "a"`, `x in ("a", "b")`)."""
    texts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
    texts += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
              for e in c.elts if isinstance(e, ast.Constant)]
    return any(t in names for t in texts if isinstance(t, str))


def test_no_method_name_is_tested_outside_methods():
    """`prune.method == "sparsegpt"` and the like: a method declares what it needs instead."""
    from dist_prune.methods import METHODS

    offences = []
    for name, tree in _modules().items():
        if name.startswith("dist_prune.methods"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                about_method = "method" in ast.unparse(node.left) + "".join(map(ast.unparse, node.comparators))
                if about_method and _compares_with(node, METHODS):
                    offences.append(f"{name}:{node.lineno}")
    assert offences == []


def test_no_isinstance_on_structure_classes_outside_their_modules():
    """A structure answers through its protocol (kind, removes_parameters, check_shape, select)."""
    classes = {"Unstructured", "NM", "Block", "Structural"}
    own = {"dist_prune.structures", "dist_prune.structural"}
    offences = []
    for name, tree in _modules().items():
        if name in own:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                if any(getattr(k, "id", None) in classes for k in kinds):
                    offences.append(f"{name}:{node.lineno}")
    assert offences == []


# DeepSpeed's own attributes of a partitioned parameter or of its optimizer
_DEEPSPEED_INTERNALS = {"ds_tensor", "ds_shape", "ds_numel", "ds_process_group", "ds_id", "_hp_mapping",
                        "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                        "zero_optimization_stage"}


def _deepspeed_uses(modules: dict[str, ast.Module]) -> list[str]:
    """Imports of deepspeed, reads of its internals and branches on a ZeRO stage number
    (`stage == 3`), outside dist_prune/sharding/ (config validation may check the stage a user
    chose; comparing a checkpoint's stage with the run's is no branch)."""
    offences = []
    for name, tree in modules.items():
        if name.startswith("dist_prune.sharding"):
            continue
        for node in ast.walk(tree):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] == "deepspeed" for m in imported):
                offences.append(f"{name}:{node.lineno} imports deepspeed")
            if isinstance(node, ast.Attribute) and node.attr in _DEEPSPEED_INTERNALS:
                offences.append(f"{name}:{node.lineno} reads {node.attr}")
            if isinstance(node, ast.Compare) and not name.startswith("dist_prune.config"):
                sides = [node.left, *node.comparators]
                numbers = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, int)]
                if numbers and any(ast.unparse(s).split(".")[-1] in ("stage", "zero_stage") for s in sides):
                    offences.append(f"{name}:{node.lineno} tests a ZeRO stage")
    return offences


def test_deepspeed_is_touched_only_by_the_sharding_package():
    """One adapter per ZeRO stage (sharding/training.py) and the partitioned build
    (sharding/partition.py): no other module imports deepspeed, reads its attributes or
    branches on the stage."""
    assert _deepspeed_uses(_modules()) == []


def test_the_deepspeed_check_finds_each_kind_of_use():
    tree = ast.parse("import deepspeed.comm\nx = p.ds_tensor\nif ft.zero_stage == 3:\n    pass\n")
    assert _deepspeed_uses({"dist_prune.train.loop": tree}) == [
        "dist_prune.train.loop:1 imports deepspeed", "dist_prune.train.loop:2 reads ds_tensor",
        "dist_prune.train.loop:3 tests a ZeRO stage"]


def _format_name_tests(modules: dict[str, ast.Module]) -> list[str]:
    from dist_prune.io.formats import FORMATS

    offences = []
    for name, tree in modules.items():
        if name.startswith("dist_prune.io.formats"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and _compares_with(node, FORMATS):
                offences.append(f"{name}:{node.lineno}")
    return offences


def test_no_format_name_is_tested_outside_the_format_modules():
    """`fmt == "sparse-24-bitmask"`, `format != "dense"`: a format declares what it does instead
    (loadable, compresses, check, layout) and only io/formats/ knows the names."""
    assert _format_name_tests(_modules()) == []


def test_the_format_name_check_finds_one():
    tree = ast.parse('if cfg.export.format != "sparse-24-bitmask" or x:\n    y = fmt in ("dense",)')
    assert _format_name_tests({"dist_prune.worker": tree}) == ["dist_prune.worker:1", "dist_prune.worker:2"]
    assert _format_name_tests({"dist_prune.io.formats.bitmask": tree}) == []
