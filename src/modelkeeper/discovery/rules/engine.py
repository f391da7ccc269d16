"""The primitives that rule tables are written in, and the matchers that apply them.

A rule table is a tuple of frozen dataclasses, each with a ``name``. Key patterns are full-line
regular expressions over tensor names (``keys(r".*attn2\\.to_k\\.weight")``); a probe measures
one dimension of the first key a pattern matches (or whether any key matches, or how many
distinct block indices there are), and rules compare the measured *evidence* with the values
they expect. A matcher raises :class:`NotAMatch` when its rule does not apply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.discovery.errors import NotAMatch
from modelkeeper.discovery.records import Base, EncoderKind, Layout, ModelType
from modelkeeper.discovery.tables import TensorLike


@dataclass(frozen=True)
class KeyPattern:
    """A full-line regular expression over tensor names.

    ``literals``: substrings of which every match contains one (one per top-level alternative);
    a search looks only at the names that contain one, and skips a file that has none. Empty when
    some alternative has no plain run of characters: the pattern then runs over every name.
    """

    source: str
    regex: re.Pattern[str]  # fullmatch against one name
    literals: tuple[str, ...]

    @property
    def literal(self) -> str:
        return self.literals[0] if len(self.literals) == 1 else ""


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a pattern (split at ``|`` outside groups and classes)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = pattern.index("]", i + 2 if pattern[i + 1 : i + 2] in ("]", "^") else i + 1) + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


def literal_of(pattern: str) -> str:
    """The longest run of plain characters outside groups and classes ('' if none, or if the
    pattern has top-level alternatives)."""
    if len(_alternatives(pattern)) > 1:
        return ""
    depth, runs, run, i = 0, [], "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            ch = pattern[i + 1] if pattern[i + 1] in ".-_/<>[]()" else None
            i += 2
        elif c == "[":
            runs.append(run)
            run = ""
            i = pattern.index("]", i + 2 if pattern[i + 1 : i + 2] in ("]", "^") else i + 1) + 1
            continue
        elif c in "()":
            depth += 1 if c == "(" else -1
            runs.append(run)
            run = ""
            i += 1
            continue
        else:
            ch = c if (c.isalnum() or c in "_-<>/") else None
            i += 1
        quantified = i < len(pattern) and pattern[i] in "?*+{"
        if depth > 0:
            continue
        if ch is None or quantified:
            runs.append(run)
            run = ""
        else:
            run += ch
    runs.append(run)
    # The most selective run: the longest that is more than a common tensor-name ending.
    return max(runs, key=lambda r: (r.strip("._") not in _COMMON, len(r)))


#: Runs that nearly every tensor name contains: a poor prefilter.
_COMMON = frozenset({"", "weight", "bias", "scale"})


def keys(pattern: str) -> KeyPattern:
    """A full-line pattern over tensor names."""
    literals = tuple(literal_of(alt) for alt in _alternatives(pattern))
    return KeyPattern(pattern, re.compile(pattern), () if "" in literals else literals)


class KeyIndex:
    """Tensor names, sorted, and joined into one text where literals are found in C."""

    __slots__ = ("_cache", "_names", "_text", "tensors")

    def __init__(self, tensors: Mapping[str, TensorLike]) -> None:
        self.tensors = tensors
        self._names = sorted(tensors)
        self._text = "\n".join(self._names)
        self._cache: dict[tuple[str, ...], list[str]] = {}

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def names(self) -> list[str]:
        """The tensor names, sorted."""
        return self._names

    def _candidates(self, pattern: KeyPattern) -> list[str]:
        """The names that may match: those containing one of the pattern's literals, in order."""
        if not pattern.literals:
            return self._names
        found = self._cache.get(pattern.literals)
        if found is None:
            found = self._with_literals(pattern.literals)
            self._cache[pattern.literals] = found
        return found

    def _with_literals(self, literals: tuple[str, ...]) -> list[str]:
        text = self._text
        many = len(self._names) // 8 + 1
        found: list[str] = []
        for lit in literals:
            i = text.find(lit)
            while i >= 0:
                if len(found) > many:  # a common literal: one pass over the names is cheaper
                    return self._names_with(literals)
                start = text.rfind("\n", 0, i) + 1
                end = text.find("\n", i + len(lit))
                end = len(text) if end < 0 else end
                found.append(text[start:end])
                i = text.find(lit, end)
        return sorted(set(found)) if len(literals) > 1 else found

    def _names_with(self, literals: tuple[str, ...]) -> list[str]:
        if len(literals) == 1:
            lit = literals[0]
            return [n for n in self._names if lit in n]
        a, *others = literals
        return [n for n in self._names if a in n or any(lit in n for lit in others)]

    def has(self, pattern: KeyPattern) -> bool:
        return self.first(pattern) is not None

    def first(self, pattern: KeyPattern) -> str | None:
        full = pattern.regex.fullmatch
        for name in self._candidates(pattern):
            if full(name):
                return name
        return None

    def all(self, pattern: KeyPattern) -> list[re.Match[str]]:
        full = pattern.regex.fullmatch
        return [m for name in self._candidates(pattern) if (m := full(name))]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape


@dataclass(frozen=True)
class Probe:
    """A measurement: ``dim`` of the first key ``pattern`` matches; presence when ``dim`` is None;
    with ``count`` the number of distinct values of the pattern's groups (block indices)."""

    name: str
    kinds: frozenset[ModelType]
    pattern: KeyPattern
    dim: int | None = None
    count: bool = False

    def measure(self, index: KeyIndex) -> Any:
        if self.count:
            found = {g for m in index.all(self.pattern) for g in m.groups() if g is not None}
            return len(found) or None
        key = index.first(self.pattern)
        if self.dim is None:
            return key is not None
        if key is None:
            return None
        shape = index.shape(key)
        return shape[self.dim] if -len(shape) <= self.dim < len(shape) else None


def measure(probes: Iterable[Probe], kind: ModelType, index: KeyIndex) -> dict[str, Any]:
    """Evidence for a component of ``kind``: the first probe of each name that yields a value wins."""
    evidence: dict[str, Any] = {}
    for probe in probes:
        if kind not in probe.kinds or evidence.get(probe.name) not in (None, False):
            continue
        value = probe.measure(index)
        if value is not None and (probe.name not in evidence or value is not False):
            evidence[probe.name] = value
    return evidence


def check(when: Mapping[str, Any], evidence: Mapping[str, Any], rule: str) -> None:
    """Raise NotAMatch unless every expected value is in the evidence (a tuple means one of)."""
    for name, expected in when.items():
        if name not in evidence:
            raise NotAMatch(f"{rule}: no evidence for {name}")
        value = evidence[name]
        ok = value in expected if isinstance(expected, tuple | frozenset) else value == expected
        if not ok:
            raise NotAMatch(f"{rule}: {name}={value!r}, wants {expected!r}")


@dataclass(frozen=True)
class ComponentRule:
    """What kind of component a group of tensors is (names stripped of the component prefix)."""

    name: str
    kind: ModelType
    layout: Layout
    requires: tuple[KeyPattern, ...]
    excludes: tuple[KeyPattern, ...] = ()
    family: str | None = None  # text encoder family: clip, openclip, t5
    base: Base | None = None  # when the architecture alone decides the base
    confidence: float = 1.0

    def match(self, index: KeyIndex) -> None:
        for p in self.requires:
            if not index.has(p):
                raise NotAMatch(f"{self.name}: no key matches {p.source}")
        for p in self.excludes:
            if index.has(p):
                raise NotAMatch(f"{self.name}: a key matches {p.source}")


@dataclass(frozen=True)
class BaseRule:
    name: str
    kinds: frozenset[ModelType]
    when: Mapping[str, Any]
    base: Base
    compatible: tuple[Base, ...] = ()
    confidence: float = 1.0

    def match(self, kind: ModelType, evidence: Mapping[str, Any]) -> None:
        if kind not in self.kinds:
            raise NotAMatch(f"{self.name}: not for {kind}")
        check(self.when, evidence, self.name)


@dataclass(frozen=True)
class VariantRule:
    name: str
    kinds: frozenset[ModelType]
    bases: frozenset[Base] | None
    when: Mapping[str, Any]
    variant: str
    confidence: float = 1.0

    def match(self, kind: ModelType, base: Base, evidence: Mapping[str, Any]) -> None:
        if kind not in self.kinds:
            raise NotAMatch(f"{self.name}: not for {kind}")
        if self.bases is not None and base not in self.bases:
            raise NotAMatch(f"{self.name}: not for base {base}")
        check(self.when, evidence, self.name)


@dataclass(frozen=True)
class EncoderRule:
    name: str
    families: frozenset[str]
    when: Mapping[str, Any]
    encoder: EncoderKind
    compatible: tuple[Base, ...]
    confidence: float = 1.0

    def match(self, evidence: Mapping[str, Any]) -> None:
        if evidence.get("family") not in self.families:
            raise NotAMatch(f"{self.name}: family {evidence.get('family')!r}")
        check(self.when, evidence, self.name)


@dataclass(frozen=True)
class ComponentPrefix:
    """A key prefix under which a single-file checkpoint keeps one component."""

    name: str
    prefix: str
    slot: str  # unet/transformer/vae/text_encoder...; "denoiser" means decided by the component's kind
    layout: Layout | None = None  # ORIGINAL for the prefixes of single-file checkpoints


@dataclass
class Decision:
    """Result of applying one table: the first rule that matched, and why the others did not."""

    rule: str | None = None
    value: Any = None
    confidence: float = 0.0
    compatible: tuple[Base, ...] = ()
    misses: list[str] = field(default_factory=list)
