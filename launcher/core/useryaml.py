"""The one reader of YAML that users write (recipes, cluster profiles, credentials, `--set` values).

PyYAML's safe loader accepts things no recipe means and some that take a machine down, so this reader
refuses, each with the line and the fix:
* bytes that are not UTF-8, and files over MAX_BYTES;
* a key given twice in one mapping (PyYAML keeps the last silently: a whole `train:` section lost);
* aliases whose expansion would exceed MAX_EXPANDED_NODES, and nesting deeper than MAX_DEPTH (a
  "billion laughs" document is a few lines, but printing or validating it never ends);
* YAML 1.1 readings a reader does not expect: `yes/no/on/off` as booleans, `1:30` as 90 (sexagesimal),
  `010` as 8 (octal), and explicit tags (`!!binary`, `!!python/...`, `!!set`...).
Everything else is PyYAML's SafeLoader, dates included (`price_date: 2026-10-01`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a recipe or profile is a few KB
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded
MAX_DEPTH = 64

_YAML11_BOOL = re.compile(r"^(yes|no|on|off|y|n)$", re.IGNORECASE)
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")


class UserYamlError(ValueError):
    """What is wrong, and where (line numbers are 1-based; 0 when unknown)."""

    def __init__(self, problem: str, line: int = 0):
        super().__init__(problem)
        self.problem, self.line = problem, line


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1 if node.start_mark else 0


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and not isinstance(event, yaml.AliasEvent):
            line = event.start_mark.line + 1 if event.start_mark else 0
            raise UserYamlError(f"the tag {tag} is not allowed here: write plain values", line)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = key_node.value
                    if key in seen:
                        raise UserYamlError(f"the key {key!r} is given twice (lines {seen[key]} and {_line(key_node)}); "
                                            "keep one: YAML would silently keep only the last", _line(key_node))
                    seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_bool(self, node):  # type: ignore[override]
        if _YAML11_BOOL.match(node.value):
            raise UserYamlError(f"{node.value!r} reads as a boolean in YAML 1.1: write true or false (or quote it "
                                "for the word)", _line(node))
        return super().construct_yaml_bool(node)

    def _refuse_base60(self, node, construct) -> None:
        if _SEXAGESIMAL.match(node.value):
            raise UserYamlError(f"{node.value!r} reads as a base-60 number in YAML 1.1 ({node.value} -> "
                                f"{construct(node)}): write the number, or quote it", _line(node))

    def construct_yaml_int(self, node):  # type: ignore[override]
        self._refuse_base60(node, super().construct_yaml_int)
        if _OCTAL.match(node.value):
            raise UserYamlError(f"{node.value!r} reads as an octal number in YAML 1.1: write it without the "
                                "leading 0, or quote it", _line(node))
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):  # type: ignore[override]
        self._refuse_base60(node, super().construct_yaml_float)
        return super().construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
# YAML 1.1 (PyYAML) reads 2e-4 and 1.0e5 -- no dot, or no sign in the exponent -- as strings; YAML 1.2 and
# every user read them as numbers. An unquoted scalar of that form is a float here, so that a quoted
# number is the only number-as-string left (and is refused where a number goes, with a hint).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _check_size(root: yaml.Node) -> None:
    """Expanded node count and depth of the composed graph, each shared (aliased) node counted every time
    it is used, in time linear in the distinct nodes."""
    memo: dict[int, tuple[int, int]] = {}

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise UserYamlError(f"nested deeper than {MAX_DEPTH} levels", _line(node))
        got = memo.get(id(node))
        if got is not None:
            return got
        memo[id(node)] = (1, 1)  # a node reached again while being visited (a recursive alias)
        size, deep = 1, 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        for child in children:
            s, d = visit(child, depth + 1)
            size += s
            deep = max(deep, d + 1)
            if size > MAX_EXPANDED_NODES:
                raise UserYamlError(f"expands to more than {MAX_EXPANDED_NODES:,} values once its aliases (*name) "
                                    "are expanded; write the values out", _line(node))
        memo[id(node)] = (size, deep)
        return size, deep

    visit(root, 1)


def loads(text: str) -> Any:
    """Parse YAML text under the rules above; raises UserYamlError (or yaml.YAMLError for bad syntax)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise UserYamlError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()


def read(path: Path) -> Any:
    """A user's YAML file: UTF-8, at most MAX_BYTES, parsed by `loads`."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserYamlError(f"{size:,} bytes; a recipe or profile is at most {MAX_BYTES:,} (is this the right file?)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserYamlError(f"not UTF-8 text (byte {e.start}): save it as UTF-8", line) from None
    return loads(text)
