"""A RAM-cache segment named by a prefix of its component id: the one rule of ``modelkeeper cache
drop`` and ``DELETE /api/model/cache/{component_id}``. A component id is 32 to 64 hex digits (with
a ``b3:``-like scheme in front, or none); a person copies the first few from a table."""

from __future__ import annotations

from collections.abc import Iterable

from modelkeeper.cache.errors import AmbiguousSegment, SegmentNotFound

#: The fewest digits a prefix may have: shorter ones would match by chance (an id itself always goes).
MIN_PREFIX = 8


def resolve_segment(prefix: str, ids: Iterable[str]) -> str:
    """The one id of ``ids`` that is ``prefix`` or starts with it (at least ``MIN_PREFIX`` digits,
    any case, with or without the id's scheme). Raises :class:`SegmentNotFound` naming the prefix
    when none does (or when it is too short to be taken for one), :class:`AmbiguousSegment` naming
    every candidate when several do."""
    ids = list(ids)
    if prefix in ids:
        return prefix
    wanted = prefix.rpartition(":")[2].lower()
    if len(wanted) < MIN_PREFIX:
        raise SegmentNotFound(
            f"no cached component {prefix!r} (a prefix of a component id needs at least {MIN_PREFIX} digits)",
            component_id=prefix,
        )
    found = [
        i
        for i in ids
        if i.lower().startswith(prefix.lower()) or i.rpartition(":")[2].lower().startswith(wanted)
    ]
    if not found:
        raise SegmentNotFound(f"no cached component {prefix!r}", component_id=prefix)  # as RamCache.get
    if len(found) > 1:
        raise AmbiguousSegment(
            f"{prefix!r} matches {len(found)} cached segments: {', '.join(found)}; give more digits",
            component_id=prefix,
            matches=found,
        )
    return found[0]
