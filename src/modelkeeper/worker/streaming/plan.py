"""The plan of partial residency, as pure functions of sizes: how many bytes a load may keep
resident (:func:`resident_limit`), which units stay resident within them (:func:`choose_resident`),
how large the ring is (:func:`pool_size`, at most :func:`pool_limit`), when streaming a unit is not
worth its ring bytes (:func:`ring_pays`), and where each unit of a pass goes in the ring
(:func:`lay_out_cycle`, of :func:`lay_out`). No I/O here; :class:`~modelkeeper.worker.streaming.Streamer` acts on the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from modelkeeper.worker.streaming.units import Unit, align_up

#: The most passes a cycle of places spans (:func:`lay_out_cycle`): each unit has a place per pass
#: of the cycle, its parameter views made once for each (``ring.VIEW_CACHE`` keeps them).
CYCLE = 3


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


def pool_limit(streamed: Sequence[Unit], target: int) -> int:
    """The most bytes the ring for ``streamed`` takes: three of the largest (one in use, the next
    always finds room, wherever the ring wraps), or ``target`` bytes (at most all of them). It
    grows with ``streamed``, so the ring of every unit bounds the ring of any part of them."""
    if not streamed:
        return 0
    return max(3 * max(u.bound for u in streamed), min(target, sum(u.bound for u in streamed)))


def pool_size(streamed: Sequence[Unit], target: int) -> int:
    """The ring for ``streamed``: :func:`pool_limit`, cut to the least that still holds a cycle of
    passes in as many laps (:func:`lay_out_cycle`) when that is more than three of the largest and
    less than all of them.

    ``p`` passes of ``total`` bytes through a ring of ``ring`` bytes take ``laps = ceil(p * total /
    (ring - largest))`` laps at most, and ``ceil(p * total / laps) + largest`` bytes hold those
    laps, in any order of the units (each lap but the last is closed only when the next unit would
    overflow it, so it is longer than ``p * total / laps``). The prefetch runs about a lap ahead: of
    the cycles of one to :data:`CYCLE` passes, the one with the longest laps sets the ring, and
    the bytes cut would have bought no depth."""
    ring = pool_limit(streamed, target)
    if not streamed:
        return ring
    largest = max(u.bound for u in streamed)
    total = sum(u.bound for u in streamed)
    if ring <= 3 * largest or ring >= total:
        return ring
    best = (0, ring)  # (lap bytes, ring bytes)
    for passes in range(1, CYCLE + 1):
        laps = -(-passes * total // (ring - largest))
        lap = -(-passes * total // laps)
        if lap > best[0]:
            best = (lap, align_up(lap) + largest)
    return min(ring, max(3 * largest, best[1]))


def _laps(sizes: Sequence[int], ring: int) -> tuple[list[int], int]:
    """The offsets of :func:`lay_out` and the length of its shortest lap."""
    if any(size > ring for size in sizes):
        raise ValueError(f"a unit of {max(sizes)} bytes does not fit a ring of {ring} bytes")
    ends = [0]
    for size in sizes:
        ends.append(ends[-1] + size)
    n = len(sizes)
    # best[i]: for the first i units, the longest shortest lap and, of those, the fewest laps (as
    # its negative: the longer the laps the deeper the prefetch); cut[i]: where their last lap starts
    best = [(ring + 1, 0)] + [(-1, 0)] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        j = i - 1
        while j >= 0 and ends[i] - ends[j] <= ring:
            score = (min(best[j][0], ends[i] - ends[j]), best[j][1] - 1)
            if score > best[i]:
                best[i], cut[i] = score, j
            j -= 1
    offsets = [0] * n
    i = n
    while i > 0:
        j = cut[i]
        for k in range(j, i):
            offsets[k] = ends[k] - ends[j]
        i = j
    return offsets, best[n][0] if n else 0


def lay_out(sizes: Sequence[int], ring: int) -> list[int]:
    """Where each unit of a sequence goes in a ring of ``ring`` bytes: its offset, for ``sizes``
    (bytes, each a multiple of ALIGN and at most ``ring``) in the order of use.

    The sequence is cut into *laps* of consecutive units, each lap laid from the ring's start.
    While a unit computes, the prefetch runs through the rest of its lap and into the next lap up
    to that unit's place (the next lap's places free as this lap's units are used): about a lap
    ahead. So the laps are cut to make the shortest one as long as it can be (a short lap starves
    the prefetch), and of those cuts, into the fewest laps."""
    return _laps(sizes, ring)[0]


def lay_out_cycle(sizes: Sequence[int], ring: int) -> list[list[int]]:
    """Where each unit of a pass goes in a ring of ``ring`` bytes, for a *cycle* of passes: per
    pass of the cycle, the offset of each unit (``sizes`` in the order of use, as for
    :func:`lay_out`).

    A cycle of ``p`` passes is laid out as one sequence (:func:`lay_out`): it is a whole number of
    laps, so the pass after the cycle starts where the cycle did, and every cycle puts each unit
    where the last one did (a unit has ``p`` places, its parameter views made once for each). A
    cycle of one pass loses what its laps cannot fill (a pass of 2.4 rings takes three laps of 0.8
    rings); a longer one spreads that over more laps (two passes: five laps of 0.96). Of the
    cycles of one to :data:`CYCLE` passes, the one whose shortest lap is longest, the shortest
    cycle on a tie."""
    if sum(sizes) <= ring:
        return [lay_out(sizes, ring)]  # one lap holds the pass: every unit stays where it is
    best: tuple[int, list[list[int]]] | None = None
    n = len(sizes)
    for passes in range(1, CYCLE + 1):
        offsets, shortest = _laps(list(sizes) * passes, ring)
        shortest = min(shortest, sum(sizes))  # a lap longer than a pass would hold a unit twice
        if best is None or shortest > best[0]:
            best = (shortest, [offsets[k * n : (k + 1) * n] for k in range(passes)])
    assert best is not None
    return best[1]


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
