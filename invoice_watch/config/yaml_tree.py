"""The YAML side of loading a configuration: from text to plain data.

The composer is PyYAML's, bounded (file size, nesting depth, and the number of values
once aliases are expanded), so that a hostile or broken file cannot take the memory or
the event loop of the process that reads it. A builder then walks the node tree
into plain data: YAML 1.1 merge keys (``<<``), duplicate keys refused, ``${VAR}``
interpolation on scalar values, exact decimals for floats (money); it records each
value's mark in a :class:`~invoice_watch.config.locations.Locations` and reports there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from invoice_watch.config.interpolation import (
    InterpolationError,
    interpolate,
    interpolate_url,
    variables,
)
from invoice_watch.config.locations import Loc, Locations, located
from invoice_watch.config.values import control_problem
from invoice_watch.errors import ConfigError, ConfigProblem

# A configuration is a few KiB and a few hundred nodes; these bounds are far above any
# real one and keep a hostile or broken file (an alias bomb, 10^9 nodes from 565 bytes)
# from taking the memory or the event loop of the process that reads it.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded
# Bytes of text (keys and values, ${VAR} replaced) once every alias is expanded: a
# 400 KB string aliased 95,000 times is under the node bound, and 38 GB of text for
# whatever walks the data (pydantic, the checks) after the builder.
MAX_EXPANDED_BYTES = 4 * MAX_CONFIG_BYTES
MAX_DEPTH = 64  # collections nested in each other
_MERGE_TAG = "tag:yaml.org,2002:merge"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_STR_TAG = "tag:yaml.org,2002:str"
_TYPED_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int")}


class _BoundExceeded(Exception):
    """The document exceeds one of the bounds above; ``mark`` is where."""

    def __init__(self, mark: Mark, message: str) -> None:
        self.mark = mark
        super().__init__(message)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (pure Python: the C loader has no hook) composing a node tree
    whose walk is bounded: each node's size and height with aliases expanded are
    memoized by node id (so counting is linear), and composing stops past
    ``MAX_EXPANDED_NODES`` or ``MAX_DEPTH``, the depth counted through aliases (ten
    anchors of 60 levels, each holding the one before, are 600 levels for whatever walks
    the data: a RecursionError). Source: PyYAML 6.0.4 ``Composer.compose_node``; LIBRARIES.md "merge
    keys and alias bombs"."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.sizes: dict[int, int] = {}  # id(collection node) -> nodes once expanded
        # id(collection node) -> collections nested in it and itself, aliases expanded
        self.heights: dict[int, int] = {}
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        alias = self.check_event(yaml.AliasEvent)
        mark: Mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.depth >= MAX_DEPTH:
            raise _BoundExceeded(
                mark,
                f"values nested more than {MAX_DEPTH} levels deep; a configuration "
                "needs about 5: check the brackets and indentation",
            )
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if node is None:
            return None
        heights = self.heights
        if alias:  # an anchored node, counted already (unless it holds this alias)
            size = self.sizes.get(id(node), 1)
            height = heights.get(id(node), 0)
        elif isinstance(node, SequenceNode):
            size = 1 + sum(self.sizes.get(id(item), 1) for item in node.value)
            self.sizes[id(node)] = size
            height = heights[id(node)] = 1 + max(
                (heights.get(id(item), 0) for item in node.value), default=0
            )
        elif isinstance(node, MappingNode):
            size = 1 + sum(
                self.sizes.get(id(key), 1) + self.sizes.get(id(value), 1)
                for key, value in node.value
            )
            self.sizes[id(node)] = size
            height = heights[id(node)] = 1 + max(
                (max(heights.get(id(k), 0), heights.get(id(v), 0)) for k, v in node.value),
                default=0,
            )
        else:
            return node
        if self.depth + height > MAX_DEPTH:  # nested through aliases (*name)
            raise _BoundExceeded(
                mark if alias else node.start_mark,
                f"values nested more than {MAX_DEPTH} levels deep through aliases (*name); "
                "a configuration needs about 5: use fewer aliases of nested values",
            )
        if size > MAX_EXPANDED_NODES:
            raise _BoundExceeded(
                node.start_mark,
                f"this value expands to more than {MAX_EXPANDED_NODES:,} values through "
                "aliases (*name); a configuration needs a few hundred: use fewer aliases",
            )
        return node


def _compose(text: str, filename: str) -> Node | None:
    """The node tree of ``text``; raises ConfigError past a bound or on invalid YAML."""
    size = len(text.encode("utf-8")) if len(text) <= MAX_CONFIG_BYTES else len(text)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([too_large(filename)])
    try:
        # PyYAML's reader checks every character as the loader is made: a control
        # character anywhere, a comment included, is refused here (a ReaderError).
        loader = _BoundedLoader(text)
    except ReaderError as exc:
        # Not chained: its message quotes the character's context, which may be a secret.
        raise ConfigError([_unacceptable(exc, text, filename)]) from None
    try:
        return loader.get_single_node()
    except _BoundExceeded as exc:
        raise ConfigError([located(filename, exc.mark, (), str(exc))]) from exc
    except yaml.YAMLError as exc:
        # Not chained: PyYAML's message quotes the line, which may hold a secret.
        raise ConfigError(_yaml_problem(exc, text, filename)) from None
    finally:
        loader.dispose()


def _unacceptable(exc: ReaderError, text: str, filename: str) -> ConfigProblem:
    """A character YAML does not allow in a document (YAML 1.1 §5.1: control
    characters but tab, line feed and carriage return; U+FFFE, U+FFFF), at its line and
    column (PyYAML's ReaderError gives only its offset)."""
    at = exc.position
    line = text.count("\n", 0, at) + 1
    column = at - text.rfind("\n", 0, at)
    code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
    return ConfigProblem(
        filename,
        line,
        column,
        "",
        f"invalid YAML: the character U+{code:04X} is not allowed in a YAML file "
        "(a control character or a noncharacter, even in a comment); remove it",
    )


def read(
    text: str, where: Locations, env: Mapping[str, str], *, unread: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The plain data of a configuration document, a mapping of sections; its problems
    go to ``where``. Raises ConfigError past a bound, on invalid YAML, and for an empty
    file or one that is not a mapping. A value under a key of ``unread`` (the secrets,
    when they are not read) whose ``${VAR}`` cannot be replaced is no problem: it
    becomes that key's value in ``unread``."""
    root = _compose(text, where.filename)
    if root is None:
        where.report(None, (), "the file is empty; see config.example.yaml for a start")
        raise ConfigError(where.problems)
    if not isinstance(root, MappingNode):
        where.report(root.start_mark, (), "expected a mapping of sections (atlas:, rules:, ...)")
        raise ConfigError(where.problems)
    builder = _Builder(where, env, unread=dict(unread or {}))
    data: dict[str, Any] = builder.build(root, ())
    return data


def too_large(filename: str) -> ConfigProblem:
    """The problem of a file over :data:`MAX_CONFIG_BYTES` (read no further)."""
    message = (
        f"the file is larger than {MAX_CONFIG_BYTES // 1024} KiB; a configuration is a few "
        "KiB: is this the configuration file?"
    )
    return located(filename, None, (), message)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _paired(text: str) -> str:
    """``text`` with each surrogate pair made the one character it encodes: a YAML
    escape is 16 bits (``"\\ud83d\\ude00"``, as JSON writes an emoji), and PyYAML
    leaves the pair as two code points. A lone surrogate stays (the value is refused,
    :func:`~invoice_watch.config.values.control_problem`)."""
    if _SURROGATE.search(text) is None:
        return text
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:  # a lone surrogate among them
        return text


def _yaml_problem(exc: yaml.YAMLError, text: str, filename: str) -> list[ConfigProblem]:
    """YAML syntax errors: tabs in indentation get their own message, one per line."""
    tabbed = [
        ConfigProblem(
            filename,
            number,
            line.index("\t") + 1,
            "",
            "tab character in indentation: YAML indents with spaces only",
        )
        for number, line in enumerate(text.splitlines(), start=1)
        if "\t" in line[: len(line) - len(line.lstrip(" \t"))]
    ]
    if tabbed:
        return tabbed
    mark = exc.problem_mark if isinstance(exc, MarkedYAMLError) else None
    problem = exc.problem if isinstance(exc, MarkedYAMLError) else None
    message = f"invalid YAML: {problem or exc}"
    if isinstance(exc, MarkedYAMLError) and exc.context and exc.context_mark:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    return [located(filename, mark, (), message + "; check indentation and quotes")]


# Plain scalars YAML 1.1 (PyYAML) reads as numbers other than the decimal one they look
# like (AD-7): octal (0100 is 64), hexadecimal, binary, base 60 (1:23:20 is 5000, and
# 22:00 is 1320); and a leading 0 that is not octal (08: text), which an int field
# takes as 8. Up to 12 digits: a 24-digit Atlas id may start with 0.
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]{1,12}")
_INT_TAG = "tag:yaml.org,2002:int"


def _number_problem(text: str, tag: str) -> str | None:
    """Why a plain scalar (resolved to ``tag``) must be written otherwise: a number YAML
    1.1 does not read as the decimal it looks like; None for the rest."""
    if tag not in (_INT_TAG, _FLOAT_TAG) and not (
        tag == _STR_TAG and _LEADING_ZERO.fullmatch(text)
    ):
        return None
    digits = text.replace("_", "")
    if ":" in text:
        return (
            f"`{text}` is a base-60 number in YAML 1.1 (1:04 is 64): write the decimal "
            'number, or put the value in quotes if it is text (a time: "22:00")'
        )
    unsigned = digits.lstrip("+-")
    for prefix, kind, base in (("0x", "a hexadecimal", 16), ("0b", "a binary", 2)):
        if unsigned.startswith(prefix):
            value = int(digits.replace(prefix, "", 1), base)
            return (
                f"`{text}` is {kind} number ({value}) in YAML: write the decimal number "
                f"{value}, or put the value in quotes if it is text"
            )
    if _LEADING_ZERO.fullmatch(text):
        decimal = ("-" if digits.startswith("-") else "") + (unsigned.lstrip("0") or "0")
        octal = "" if tag == _STR_TAG else f" ({int(digits, 8)})"
        return (
            f"`{text}` has a leading 0, which YAML reads as an octal number{octal}: write "
            f"the decimal number {decimal}, or put the value in quotes if it is text"
        )
    return None


@dataclass
class _Scalar:
    """A scalar node's value, built once however many aliases refer to it."""

    value: Any
    broken: bool  # its problem was reported (at its first place)


@dataclass
class _Builder:
    """The plain data of one document's nodes; marks and problems go to ``where``.

    Each scalar node is built (interpolated, checked, constructed) once, however many
    aliases refer to it, and the text of every place it appears at is counted against
    :data:`MAX_EXPANDED_BYTES`: time and memory stay linear in the file."""

    where: Locations
    env: Mapping[str, str]  # for ${VAR}
    unread: dict[str, str] = field(default_factory=dict)  # key -> value if ${VAR} fails
    constructor: SafeConstructor = field(default_factory=SafeConstructor)
    open_nodes: set[Node] = field(default_factory=set)  # being built: catches alias cycles
    merged: dict[int, dict[str, tuple[Node, Node]]] = field(default_factory=dict)  # by node id
    merging: set[int] = field(default_factory=set)  # ids of mappings being merged
    scalars: dict[int, _Scalar] = field(default_factory=dict)  # by node id
    building: list[Node] = field(default_factory=list)  # the collections being built
    expanded: int = 0  # bytes of text so far, aliases expanded

    def build(self, node: Node, loc: Loc) -> Any:
        """The plain data of ``node``; interpolates scalar values, resolves merge keys.
        Walks each alias again (the composer bounded the number of places), building
        each scalar once. Raises ConfigError past :data:`MAX_EXPANDED_BYTES`."""
        self.where.marks[loc] = node.start_mark
        if isinstance(node, ScalarNode):
            scalar = self.scalars.get(id(node))
            if scalar is None:
                scalar = self.scalars[id(node)] = self._scalar(node, loc)
            elif scalar.broken:
                self.where.set_broken(loc)
            self._count(scalar.value, self.building[-1] if self.building else node)
            return scalar.value
        if node in self.open_nodes:
            self.where.report(node.start_mark, loc, "an alias cannot refer to a node that holds it")
            self.where.set_broken(loc)
            return None
        self.open_nodes.add(node)
        self.building.append(node)
        data: Any
        if isinstance(node, SequenceNode):
            data = [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        else:
            assert isinstance(node, MappingNode)
            data = {}
            for key, value_node in self._pairs(node, loc).items():
                self._count(key, node)
                data[key] = self.build(value_node, (*loc, key))
        self.open_nodes.remove(node)
        self.building.pop()
        return data

    def _count(self, value: Any, node: Node) -> None:
        self.expanded += len(value) if isinstance(value, str) else 8
        if self.expanded > MAX_EXPANDED_BYTES:
            message = (
                f"the values expand to more than {MAX_EXPANDED_BYTES // 2**20} MiB of text "
                "through aliases (*name) or ${VAR}; a configuration is a few KiB: use "
                "fewer aliases of long values"
            )
            raise ConfigError([located(self.where.filename, node.start_mark, (), message)])

    def _pairs(self, node: MappingNode, loc: Loc) -> dict[str, Node]:
        """The keys and value nodes of a mapping, merge keys resolved."""
        pairs = self._merged(node, loc, 0)
        for key, (key_node, _) in pairs.items():
            self.where.key_marks[(*loc, key)] = key_node.start_mark
        return {key: value_node for key, (_, value_node) in pairs.items()}

    def _merged(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, tuple[Node, Node]]:
        """The pairs of ``node`` by key after YAML 1.1 merge keys (``<<: *a``, ``<<: [*a,
        *b]``; https://yaml.org/type/merge.html): the mapping's own keys override merged
        ones, and a mapping earlier in a ``<<`` list overrides a later one. Only a key
        given twice among the mapping's own is a duplicate. Memoized per node, so each
        alias is resolved once. (PyYAML's ``flatten_mapping`` is not used: in 6.0.4 which
        merged key wins depends on whether Python interned the key's string.)"""
        done = self.merged.get(id(node))
        if done is not None:
            return done
        if id(node) in self.merging or depth > MAX_DEPTH:
            self.where.report(node.start_mark, loc, "an alias cannot refer to a node that holds it")
            return {}
        self.merging.add(id(node))
        merged: dict[str, tuple[Node, Node]] = {}
        own: dict[str, tuple[Node, Node]] = {}
        merge_seen = False
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG and not merge_seen:
                merge_seen = True
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, MappingNode):
                        self.where.report(
                            source.start_mark,
                            loc,
                            "`<<` merges a mapping (`<<: *name`) or a list of them "
                            "(`<<: [*a, *b]`)",
                        )
                        continue
                    for merged_key, pair in self._merged(source, loc, depth + 1).items():
                        merged.setdefault(merged_key, pair)
                continue
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if key is None:
                self.where.report(key_node.start_mark, loc, "keys must be plain names")
            elif problem := control_problem(key):
                self.where.report(key_node.start_mark, loc, f"the key {problem}")
            elif key in own:
                first = own[key][0].start_mark.line + 1
                self.where.report(
                    key_node.start_mark,
                    (*loc, key),
                    f"duplicate key `{key}` (first at line {first}); keep only one",
                )
            else:
                own[key] = (key_node, value_node)
        self.merging.discard(id(node))
        self.merged[id(node)] = pairs = merged | own
        return pairs

    def _scalar(self, node: ScalarNode, loc: Loc) -> _Scalar:
        node.value = _paired(node.value)
        if "$" in node.value:
            try:
                # (state.url: a password in its user info is percent-encoded)
                fill = interpolate_url if loc == ("state", "url") else interpolate
                value = fill(node.value, self.env, limit=MAX_CONFIG_BYTES)
            except InterpolationError as exc:
                if loc and str(loc[-1]) in self.unread and loc[0] != "state":
                    return _Scalar(self.unread[str(loc[-1])], broken=False)
                self.where.report(node.start_mark, loc, str(exc))
                self.where.set_broken(loc)
                return _Scalar(node.value, broken=True)
            # Checked here, not only by the model, to name the variable and skip the
            # field's own errors: none may quote a control character (or a secret).
            if problem := control_problem(value):
                names = ", ".join(f"${{{name}}}" for name in variables(node.value))
                self.where.report(node.start_mark, loc, f"the value from {names or '$'} {problem}")
                self.where.set_broken(loc)
                return _Scalar(value, broken=True)
            return _Scalar(value, broken=False)
        if problem := control_problem(node.value):
            self.where.report(node.start_mark, loc, f"the value {problem}")
            self.where.set_broken(loc)
            return _Scalar(node.value, broken=True)
        extension = bool(loc) and str(loc[0]).startswith("x-")  # ignored fields
        problem = None if extension or node.style else _number_problem(node.value, node.tag)
        if problem:
            self.where.report(node.start_mark, loc, problem)
            self.where.set_broken(loc)
            return _Scalar(node.value, broken=True)
        return _Scalar(self._construct(node), broken=False)

    def _construct(self, node: ScalarNode) -> Any:
        """A plain scalar's value: text, or the null, bool, int or (exact) decimal its
        YAML tag says."""
        try:
            if node.tag == _FLOAT_TAG:
                try:  # keep the decimal text exact (money)
                    return Decimal(node.value.replace("_", ""))
                except InvalidOperation:
                    return self.constructor.construct_object(node)
            if node.tag in _TYPED_TAGS:
                return self.constructor.construct_object(node)
        except ValueError:  # an int of more than 4300 digits: the field says what it wants
            pass
        return node.value
