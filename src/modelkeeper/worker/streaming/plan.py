"""The plan of partial residency, as pure functions of sizes: how many bytes a load may keep
resident (:func:`resident_limit`), which units stay resident within them (:func:`choose_resident`),
how large the ring is (:func:`pool_size`), and when streaming a unit is not worth its ring bytes
(:func:`ring_pays`). No I/O here; :class:`~modelkeeper.worker.streaming.Streamer` acts on the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from modelkeeper.worker.streaming.units import Unit


def choose_resident(sizes: Sequence[int], budget: int, *, keep: Iterable[int] = ()) -> set[int]:
    """Which units (by index, in order of use) to keep resident within ``budget`` bytes.

    Resident units are spread evenly through the order (a resident unit's compute is time the copy
    engine uses for the next streamed one), then any room left takes the largest that still fit.
    ``keep`` are resident whatever the budget (counted against it first)."""
    chosen = set(keep)
    used = sum(sizes[i] for i in chosen)
    total = sum(sizes) or 1
    share = max(0.0, min(1.0, (budget - used) / total))
    seen = placed = 0
    for i, size in enumerate(sizes):
        seen += size
        if i in chosen:
            continue
        if placed + size <= share * seen and used + size <= budget:
            chosen.add(i)
            placed += size
            used += size
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if i not in chosen and used + sizes[i] <= budget:
            chosen.add(i)
            used += sizes[i]
    return chosen


def pool_size(streamed: Sequence[Unit], target: int) -> int:
    """The ring for ``streamed``: three of the largest (one in use, the next always finds room,
    wherever the ring wraps), or ``target`` bytes (at most all of them)."""
    if not streamed:
        return 0
    return max(3 * max(u.bound for u in streamed), min(target, sum(u.bound for u in streamed)))


def ring_pays(units: Sequence[Unit], resident: Iterable[int], target: int) -> set[int]:
    """``resident`` (indices into ``units``) grown until the ring takes fewer bytes than the units it
    streams: while it would take as many (a model of few blocks: the ring holds three of the largest),
    the largest streamed unit stays resident instead. So a streamed module never needs more device
    bytes than the same module resident (at worst it is resident whole, with no ring)."""
    chosen = set(resident)
    while True:
        streamed = [i for i in range(len(units)) if i not in chosen]
        if not streamed or pool_size([units[i] for i in streamed], target) < sum(
            units[i].nbytes for i in streamed
        ):
            return chosen
        chosen.add(max(streamed, key=lambda i: units[i].nbytes))


def resident_limit(offload: str | int, required: int, free: int) -> int | None:
    """The resident bytes a load with ``offload`` may keep, or None to load the whole model as
    always (``none``; ``auto`` when it fits ``free``; a cap at least ``required``)."""
    if offload == "none":
        return None
    if offload == "auto":
        return None if required <= free else free
    assert isinstance(offload, int)
    return None if offload >= required else offload
