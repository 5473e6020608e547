"""The YAML of job configs, sweep files and override values: YAML 1.2-style numbers, and limits
that a hostile or careless file cannot get past.

PyYAML builds an alias as a reference to the anchored object, so a "billion laughs" file of nine
nested lists of nine aliases loads in microseconds as a small graph; it explodes only in whatever
walks it as a tree afterwards (environment expansion, merging, hashing the config): 41 s and
2.5 GB for a 420-byte file. The size the document would have as a tree is computed on the graph
of nodes, before anything is constructed, and bounded. Duplicate keys, which PyYAML merges
silently (the later one wins), are refused with the lines of both.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from dist_prune.errors import UserError

# A job config is about 1 KB (configs/quickstart.yaml); a sweep file a little more.
MAX_BYTES = 256 * 1024
# Nodes plus scalar characters of the document with every alias written out. Without aliases a
# document is at most about twice its bytes (a node and its text cannot take less room in the
# file), so any file under MAX_BYTES passes; with them, 1e6 is a millisecond of walking.
MAX_EXPANDED = 1_000_000
_MERGE = "tag:yaml.org,2002:merge"


class ConfigYAMLError(yaml.MarkedYAMLError):
    """A document that is valid YAML but refused; `problem` says why, at `problem_mark`."""


class Loader(yaml.SafeLoader):
    """YAML without 1.1's base-60 integers (so `structure: 2:4` is the string "2:4", not 124), with
    exponent-only floats, a bound on alias expansion and no duplicate keys."""

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                    continue  # unhashable keys: PyYAML's own error; merges: later keys win by design
                key = self.construct_object(key_node)
                seen = first.setdefault(key, key_node)
                if seen is not key_node:
                    raise ConfigYAMLError(problem=f"duplicate key '{key}' (first at line "
                                                  f"{seen.start_mark.line + 1})",
                                          problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_INT = "tag:yaml.org,2002:int"
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
# YAML 1.1 reads 3e-4 (no dot) as a string; every ML config writes learning rates that way.
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _check_expansion(root) -> None:
    """Refuse a node graph whose tree (aliases written out) exceeds MAX_EXPANDED, or that holds
    itself (`&a [*a]`). Each node is sized once: linear in the graph, whatever it expands to."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative: a deeply nested file must not exhaust Python's recursion
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, ScalarNode):
            sizes[id(node)] = 1 + len(node.value)
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, MappingNode)
                    else list(node.value) if isinstance(node, SequenceNode) else [])
        if not children_done:
            if id(node) in open_:
                raise ConfigYAMLError(problem="an alias refers to a node that contains it",
                                      problem_mark=node.start_mark)
            open_.add(id(node))
            stack.append((node, True))
            for child in children:
                if id(child) in open_:
                    raise ConfigYAMLError(problem="an alias refers to a node that contains it",
                                          problem_mark=child.start_mark)
                stack.append((child, False))
            continue
        open_.discard(id(node))
        size = 1 + sum(sizes[id(child)] for child in children)
        if size > MAX_EXPANDED:
            raise ConfigYAMLError(problem=f"aliases expand this node beyond {MAX_EXPANDED:,} nodes and "
                                          f"characters; write the values out instead",
                                  problem_mark=node.start_mark)
        sizes[id(node)] = size


def parse(text: str):
    """One YAML document (an override's value, a config's text); yaml.YAMLError if refused."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def read_file(path: Path, what: str = "config file"):
    """The YAML document of the file `path`; UserError naming the file (and the line) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{what} {path} is {size:,} bytes, over the {MAX_BYTES:,} a config may have")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    try:
        return parse(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        if isinstance(e, ConfigYAMLError):
            raise UserError(f"{what} {path}{where}: {e.problem}") from None
        problem = getattr(e, "problem", None)
        raise UserError(f"{what} {path}{where}: not valid YAML{f' ({problem})' if problem else ''}") from None
