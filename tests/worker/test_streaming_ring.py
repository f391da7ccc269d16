"""The ring's places (``lay_out``, ``Ring.arrange``): once a pass is recorded every call of a streamed
unit has a fixed place, so at any ring size the passes after the first ones make no parameter views and miss
nothing, the prefetch runs as deep as the ring allows, and a pass whose order changes (a unit
skipped, another path through the module) stays bit-identical to the resident module."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from modelkeeper.worker.streaming import ALIGN, Streamer, find_units, lay_out, pool_limit, pool_size

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
        lengths = []
        for lap in laps(offsets):
            at = 0
            for i in lap:  # each lap from the start, its units one after the other
                assert offsets[i] == at
                at += sizes[i]
            assert at <= ring
            lengths.append(at)
        greedy, lap_bytes = [], 0  # laps filled as far as they go
        for size in sizes:
            if lap_bytes + size > ring:
                greedy.append(lap_bytes)
                lap_bytes = 0
            lap_bytes += size
        assert min(lengths) >= min([*greedy, lap_bytes])


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
        most = -(-total // (target - largest))  # the laps the target's ring would take
        for order in (units, units[::-1], sorted(units, key=lambda u: u.bound)):
            assert len(laps(lay_out([u.bound for u in order], ring))) <= most


# ----------------------------------------------------------------------------- the streamer


def test_a_deep_ring_repeats_its_places_and_prefetches_deeper(one_unit_per_layer: None) -> None:
    """With a ring eight times the largest unit (two passes of 200 kB through 115 kB), the passes after
    the first two make no views and miss nothing (before each unit had a place, such a ring placed
    units anew each pass: a hundred views a pass), copy each unit at most once a pass, and keep
    more units in flight than the default ring of three of the largest."""
    module, deep = stream(8 * largest_unit())
    assert deep.pool_bytes >= 5 * largest_unit()
    assert deep.pool_bytes < deep.streamed_bytes  # it streams: a unit's place is reused in a pass
    warm, *steady = run(module, deep, range(len(WIDTHS)), 6)
    assert warm[1] == len(deep._streamed)  # the first pass learns the order: every unit on demand
    for views, misses, copied in steady[1:]:
        assert (views, misses) == (0, 0)
        assert copied <= deep.streamed_bytes + len(deep._streamed) * 2 * ALIGN
    base_module, base = stream(None)
    assert base.pool_bytes == 3 * largest_unit()
    assert run(base_module, base, range(len(WIDTHS)), 4)[-1][:2] == (0, 0)
    assert deep.stats.depth >= 2 * base.stats.depth >= 4
    assert deep.describe()["depth"] == deep.stats.depth
    deep.close()
    base.close()


@pytest.mark.parametrize("ring", [None, 8], ids=["default ring", "ring of 8 largest"])
def test_a_pass_order_that_changes_stays_exact_and_settles_again(
    one_unit_per_layer: None, ring: int | None
) -> None:
    """Each new order is recorded at the end of its first pass and the units take new places: the
    outputs stay bit-identical throughout, and once the new order repeats the views stop again."""
    module, s = stream(None if ring is None else ring * largest_unit())
    n = len(WIDTHS)
    paths: list[Sequence[int]] = [
        range(n),
        [i for i in range(n) if i not in (3, 4, 17)],  # units skipped
        [*range(n // 2, n), *range(n // 2)],  # another path: the second half first
        [*range(n), 5, 6],  # units called twice in a pass
        range(n),
    ]
    for path in paths:
        done = run(module, s, path, 4)
        assert done[-1][:2] == (0, 0), done
    for path in paths[:2] * 2:  # orders that alternate: exact, whatever they cost
        run(module, s, path, 1)
    s.close()
