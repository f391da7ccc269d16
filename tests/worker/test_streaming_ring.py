"""The ring's places (``lay_out``, ``lay_out_cycle``, ``Ring.arrange``): once a pass is recorded every
call of a streamed unit has a fixed place in each pass of a cycle of one to three, so at any ring size
the passes after the first cycle make no parameter views and miss nothing, the prefetch runs as deep as the ring allows, and a pass whose order changes (a unit
skipped, another path through the module) stays bit-identical to the resident module."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch

from modelkeeper.worker.streaming import (
    ALIGN,
    Streamer,
    find_units,
    lay_out,
    lay_out_cycle,
    pool_limit,
    pool_size,
)
from modelkeeper.worker.streaming.plan import CYCLE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [(37 * i) % 96 + 8 for i in range(30)]  # hidden widths: units of 1 to 14 kB, in no order


class Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, hidden)
        self.b = torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class Stack(torch.nn.Module):
    """Residual blocks of several sizes, called in the order of ``path`` (all of them by default)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(Block(32, h) for h in WIDTHS)
        self.path: Sequence[int] = range(len(WIDTHS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.path:
            x = self.blocks[i](x)
        return x


@pytest.fixture
def one_unit_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelkeeper.worker.streaming.units.GROUP_BYTES", 1)


def largest_unit() -> int:
    return max(u.bound for u in find_units(Stack(), "Stack"))


def stream(ring: int | None) -> tuple[Stack, Streamer]:
    """A fully streamed Stack (``ring``: bytes of its ring, None for the default)."""
    module = Stack().eval()
    return module, Streamer(module, torch.device("cpu"), "Stack", 0, pool_bytes=ring)


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))


def resident_output(path: Sequence[int]) -> torch.Tensor:
    module = Stack().eval()
    module.path = path
    with torch.no_grad():
        return module(X)


def run(module: Stack, s: Streamer, path: Sequence[int], passes: int) -> list[tuple[int, int, int]]:
    """``passes`` passes along ``path``, each checked against the resident module; the (views,
    misses, copied bytes) of each."""
    module.path = path
    want = resident_output(path)
    done = []
    for _ in range(passes):
        before = (s.stats.views, s.stats.misses, s.stats.bytes)
        with torch.no_grad():
            got = module(X)
        assert torch.equal(got, want)
        done.append((s.stats.views - before[0], s.stats.misses - before[1], s.stats.bytes - before[2]))
    return done


# ----------------------------------------------------------------------------- lay_out, pool_size


def laps(offsets: list[int]) -> list[list[int]]:
    """The indices of each lap (a lap starts where an offset goes back to 0)."""
    out: list[list[int]] = []
    for i, at in enumerate(offsets):
        if at == 0:
            out.append([])
        out[-1].append(i)
    return out


def lap_lengths(offsets: list[int], sizes: list[int]) -> list[int]:
    """The bytes of each lap, checking that its units follow each other from the ring's start."""
    lengths = []
    for lap in laps(offsets):
        at = 0
        for i in lap:
            assert offsets[i] == at
            at += sizes[i]
        lengths.append(at)
    return lengths


@pytest.mark.parametrize(
    ("sizes", "ring", "want"),
    [
        ([1, 2, 1], 8, [0, 1, 3]),  # one lap: all held, nothing copied again
        ([1] * 5, 4, [0, 1, 2, 0, 1]),  # laps of 3 and 2, not 4 and 1: the shortest as long as it can be
        ([3, 3, 3, 1], 9, [0, 3, 0, 3]),  # 6 and 4, not 9 and 1
        ([2, 1, 1, 2, 2], 4, [0, 2, 3, 0, 2]),  # 4 and 4
        ([], 4, []),
    ],
)
def test_lay_out_cuts_a_pass_into_laps_whose_shortest_is_longest(
    sizes: list[int], ring: int, want: list[int]
) -> None:
    scale = ALIGN
    assert lay_out([s * scale for s in sizes], ring * scale) == [w * scale for w in want]


def test_lay_out_places_fit_in_order_and_beat_filling_each_lap() -> None:
    rng = random.Random(3)
    for _ in range(200):
        ring = rng.randint(3, 40) * ALIGN
        sizes = [rng.randint(1, ring // ALIGN // 3) * ALIGN for _ in range(rng.randint(1, 60))]
        offsets = lay_out(sizes, ring)
        lengths = lap_lengths(offsets, sizes)
        assert max(lengths) <= ring
        greedy, lap_bytes = [], 0  # laps filled as far as they go
        for size in sizes:
            if lap_bytes + size > ring:
                greedy.append(lap_bytes)
                lap_bytes = 0
            lap_bytes += size
        assert min(lengths) >= min([*greedy, lap_bytes])


@pytest.mark.parametrize(
    ("sizes", "ring", "want"),
    [
        ([1, 2, 1], 8, [[0, 1, 3]]),  # one lap holds the pass: one pass, every unit held
        ([1, 2, 1], 5, [[0, 1, 3]]),
        ([1] * 5, 4, [[0, 1, 2, 3, 0], [1, 2, 0, 1, 2]]),  # two passes: laps of 4, 3 and 3, not 3 and 2
        ([1] * 7, 3, [[0, 1, 2] * 2 + [0], [1, 2, 0] * 2 + [1], [2, 0, 1] * 2 + [2]]),  # three: laps of 3
        ([3, 3, 3, 3], 8, [[0, 3, 0, 3]]),  # as long in one pass as in more: one
    ],
)
def test_lay_out_cycle_takes_the_passes_whose_shortest_lap_is_longest(
    sizes: list[int], ring: int, want: list[list[int]]
) -> None:
    scale = ALIGN
    got = lay_out_cycle([s * scale for s in sizes], ring * scale)
    assert got == [[w * scale for w in cycle_pass] for cycle_pass in want]


def test_a_cycle_is_a_whole_number_of_laps_at_least_as_long_as_one_pass() -> None:
    rng = random.Random(4)
    for _ in range(100):
        ring = rng.randint(3, 40) * ALIGN
        sizes = [rng.randint(1, ring // ALIGN // 3) * ALIGN for _ in range(rng.randint(1, 40))]
        cycle = lay_out_cycle(sizes, ring)
        assert 1 <= len(cycle) <= CYCLE
        lengths = lap_lengths([at for cycle_pass in cycle for at in cycle_pass], sizes * len(cycle))
        assert max(lengths) <= ring
        one = lap_lengths(lay_out(sizes, ring), sizes)
        assert min(lengths) >= min(one) or sum(sizes) <= ring


def test_lay_out_refuses_a_unit_larger_than_the_ring() -> None:
    with pytest.raises(ValueError, match="does not fit a ring of 512 bytes"):
        lay_out([256, 768], 512)


def test_a_large_ring_is_cut_to_whole_laps(one_unit_per_layer: None) -> None:
    units = find_units(Stack(), "Stack")
    largest = max(u.bound for u in units)
    total = sum(u.bound for u in units)
    assert pool_size(units, 0) == pool_limit(units, 0) == 3 * largest  # the default ring as before
    assert pool_size(units, 10 * total) == total  # everything held
    for target in (5 * largest, 8 * largest, total // 2, total - 1):
        ring = pool_size(units, target)
        assert 3 * largest <= ring <= pool_limit(units, target) == target
        for order in (units, units[::-1], sorted(units, key=lambda u: u.bound)):
            sizes = [u.bound for u in order]  # each lap is at most a largest unit short of the ring
            cycle = lay_out_cycle(sizes, ring)
            offsets = [at for cycle_pass in cycle for at in cycle_pass]
            assert min(lap_lengths(offsets, sizes * len(cycle))) >= ring - 2 * largest


# ----------------------------------------------------------------------------- the streamer


def test_a_deep_ring_repeats_its_places_and_prefetches_deeper(one_unit_per_layer: None) -> None:
    """With a ring eight times the largest unit (406 kB a pass through 114 kB), the passes after the
    first cycle make no views and miss nothing (before each unit had a place, such a ring placed
    units anew each pass: a hundred views a pass), copy each unit at most once a pass, and keep
    more units in flight than the default ring of three of the largest."""
    module, deep = stream(8 * largest_unit())
    assert deep.pool_bytes >= 5 * largest_unit()
    assert deep.pool_bytes < deep.streamed_bytes  # it streams: a unit's place is reused in a pass
    cycles = math.lcm(*range(1, CYCLE + 1))  # passes that make whole cycles
    first, *rest = run(module, deep, range(len(WIDTHS)), 1 + CYCLE + cycles)
    assert first[1] == len(deep._streamed)  # the first pass learns the order: every unit on demand
    steady = rest[CYCLE:]
    assert [(views, misses) for views, misses, _ in steady] == [(0, 0)] * cycles
    padding = len(deep._streamed) * 2 * ALIGN  # a copy starts at its host alignment
    assert sum(copied for _, _, copied in steady) <= cycles * (deep.streamed_bytes + padding)
    base_module, base = stream(None)
    assert base.pool_bytes == 3 * largest_unit()
    assert run(base_module, base, range(len(WIDTHS)), 2 + CYCLE + 1)[-1][:2] == (0, 0)
    assert deep.stats.depth >= 2 * base.stats.depth >= 4
    assert deep.describe()["depth"] == deep.stats.depth
    deep.close()
    base.close()


@pytest.mark.parametrize("ring", [None, 8], ids=["default ring", "ring of 8 largest"])
def test_a_pass_order_that_changes_stays_exact_and_settles_again(
    one_unit_per_layer: None, ring: int | None
) -> None:
    """Each new order is recorded at the end of its first pass and the units take new places: the
    outputs stay bit-identical throughout, and once the new order has run a cycle the views stop
    again."""
    module, s = stream(None if ring is None else ring * largest_unit())
    n = len(WIDTHS)
    paths: list[tuple[Sequence[int], int]] = [  # (path, misses a pass once settled)
        (range(n), 0),
        ([i for i in range(n) if i not in (3, 4, 17)], 0),  # units skipped
        ([*range(n // 2, n), *range(n // 2)], 0),  # another path: the second half first
        # units called twice in a pass: a place per call, but one held at its last call's place may
        # be in the way of the next pass's copy after it (that copy then waits for it)
        ([*range(n), 5, 6], 1),
        (range(n), 0),
    ]
    for path, misses in paths:
        done = run(module, s, path, 2 + CYCLE + 1)
        assert done[-1][0] == 0 and done[-1][1] <= misses, done
    for path, _ in paths[:2] * 2:  # orders that alternate: exact, whatever they cost
        run(module, s, path, 1)
    s.close()


@pytest.mark.parametrize(
    "ring", [None, 5, 13, 40], ids=lambda r: "default ring" if r is None else f"{r} largest"
)
def test_random_orders_stay_exact(one_unit_per_layer: None, ring: int | None) -> None:
    """Paths drawn at random (subsets, shuffles, units called many times, repeats of the last path):
    whatever the ring holds and wherever, every pass computes with the right bytes."""
    rng = random.Random(ring or 0)
    module, s = stream(None if ring is None else ring * largest_unit())
    n = len(WIDTHS)
    path: list[int] = list(range(n))
    for _ in range(15):
        draw = rng.random()
        if draw < 0.2:
            path = sorted(rng.sample(range(n), rng.randint(1, n)))
        elif draw < 0.4:
            path = list(range(n))
            rng.shuffle(path)
        elif draw < 0.6:
            path = [rng.randrange(n) for _ in range(rng.randint(1, 2 * n))]
        run(module, s, path, 1)  # else the same path again
    s.close()
