"""The placement policy on tables of cases: pure functions, no workers, no clock."""

from __future__ import annotations

import pytest

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView, Resident, choose_device, plan_eviction
from modelkeeper.orchestrator.placement_tiers import choose_placement
from modelkeeper.orchestrator.tiers import ClusterView, NodeView, Tier


def dev(id: str, budget: int, *residents: Resident, loading: tuple[str, ...] = ()) -> DeviceView:
    return DeviceView(id, budget, sum(r.bytes for r in residents), residents, frozenset(loading))


def r(model: str, size: int, used: float = 0.0, **flags: bool) -> Resident:
    return Resident(model, size, used, **flags)


CHOOSE = [
    # (case, devices, model, need, force, expected device or the error's words)
    ("already loaded wins over room", [dev("a", 100), dev("b", 100, r("m", 10))], "m", 10, False, "b"),
    ("being loaded wins too", [dev("a", 100), dev("b", 100, loading=("m",))], "m", 10, False, "b"),
    (
        "most free budget that fits",
        [dev("a", 100, r("x", 60)), dev("b", 100, r("y", 30))],
        "m",
        20,
        False,
        "b",
    ),
    ("one fits, one does not", [dev("a", 100, r("x", 95)), dev("b", 50)], "m", 40, False, "b"),
    (
        "evict where most room after",
        [dev("a", 100, r("x", 60, leased=True), r("y", 35)), dev("b", 100, r("z", 70), r("w", 25))],
        "m",
        50,
        False,
        "b",
    ),
    (
        "leased models stay",
        [dev("a", 100, r("x", 90, leased=True)), dev("b", 100, r("y", 70))],
        "m",
        50,
        False,
        "b",
    ),
    (
        "kept models stay",
        [dev("a", 100, r("x", 90, keep_loaded=True)), dev("b", 100, r("y", 70))],
        "m",
        50,
        False,
        "b",
    ),
    ("force reaches leased models", [dev("a", 100, r("x", 90, leased=True))], "m", 50, True, "a"),
    ("a loading model never goes", [dev("a", 100, r("x", 90, loaded=False))], "m", 50, True, "held by x"),
    (
        "bigger than every budget",
        [dev("a", 100), dev("b", 50)],
        "m",
        101,
        False,
        "more than the budget of any device",
    ),
    ("no room even after eviction", [dev("a", 100, r("x", 90, leased=True))], "m", 50, False, "held by x"),
    ("no device at all", [], "m", 1, False, "no worker is running"),
]


@pytest.mark.parametrize(
    ("case", "devices", "model", "need", "force", "expected"), CHOOSE, ids=[c[0] for c in CHOOSE]
)
def test_choose_device(
    case: str, devices: list[DeviceView], model: str, need: int, force: bool, expected: str
) -> None:
    if len(expected) == 1:
        assert choose_device(devices, model, need, force=force) == expected
    else:
        with pytest.raises(NotPlaceable, match=expected):
            choose_device(devices, model, need, force=force)


EVICT = [
    ("fits: nothing goes", dev("a", 100, r("x", 30)), 50, False, []),
    ("least recently used first", dev("a", 100, r("x", 40, 2.0), r("y", 40, 1.0)), 50, False, ["y"]),
    (
        "as many as needed",
        dev("a", 100, r("x", 40, 2.0), r("y", 40, 1.0), r("z", 10, 3.0)),
        90,
        False,
        ["y", "x"],
    ),
    ("leased skipped", dev("a", 100, r("x", 40, 2.0), r("y", 40, 1.0, leased=True)), 50, False, ["x"]),
    ("force takes the leased", dev("a", 100, r("x", 40, 2.0), r("y", 40, 1.0, leased=True)), 50, True, ["y"]),
    ("the model itself never", dev("a", 100, r("m", 40, 0.0), r("y", 40, 1.0)), 50, False, ["y"]),
]


@pytest.mark.parametrize(("case", "device", "need", "force", "expected"), EVICT, ids=[c[0] for c in EVICT])
def test_plan_eviction(case: str, device: DeviceView, need: int, force: bool, expected: list[str]) -> None:
    assert plan_eviction(device, "m", need, force=force) == expected


def test_plan_eviction_refuses_with_the_reason() -> None:
    with pytest.raises(
        NotPlaceable, match="m needs 101 B; the budget of a is 100 B; load it with offload auto"
    ) as err:
        plan_eviction(dev("a", 100), "m", 101)
    assert err.value.details["required_bytes"] == 101
    with pytest.raises(NotPlaceable, match=r"leased, kept loaded or busy \(x, y\)") as err:
        plan_eviction(dev("a", 100, r("x", 40, leased=True), r("y", 40, keep_loaded=True)), "m", 50)
    assert err.value.details["held"] == ["x", "y"]


# --- The tiered choice over a cluster (choose_placement) --------------------------------------------

GB = 10**9


def cdev(id: str, *residents: Resident, budget: int = 80 * GB, busy_until: float = 0.0) -> DeviceView:
    """A device named ``node/index``, its node taken from the name."""
    node = id.split("/", maxsplit=1)[0]
    used = sum(x.bytes for x in residents)
    return DeviceView(id, budget, used, residents, node=node, busy_until=busy_until)


def cluster(
    devices: list[DeviceView], ram: dict[str, str] | None = None, disk: dict[str, str] | None = None
) -> ClusterView:
    """``ram``/``disk``: node -> the models (space-separated) it caches in RAM / has on disk."""
    names = {d.node for d in devices} | set(ram or {}) | set(disk or {})
    nodes = [
        NodeView(n, frozenset((ram or {}).get(n, "").split()), frozenset((disk or {}).get(n, "").split()))
        for n in sorted(names)
    ]
    return ClusterView.of(devices, nodes)


PLACE = [
    # (case, cluster, model, need, now, expected (device, tier, source, evict) or the error's words)
    (
        "in VRAM wins over a RAM cache",
        cluster([cdev("a/0", r("m", 10 * GB)), cdev("b/0")], ram={"b": "m"}),
        "m", 10 * GB, 0.0, ("a/0", Tier.VRAM, "", ()),
    ),
    (
        "a node's RAM cache over a node with the file",
        cluster([cdev("a/0"), cdev("b/0")], ram={"b": "m"}, disk={"a": "m"}),
        "m", 10 * GB, 0.0, ("b/0", Tier.RAM, "b", ()),
    ),
    (
        "a peer's RAM cache over the local disk",
        cluster([cdev("a/0"), cdev("b/0", busy_until=50.0)], ram={"b": "m"}, disk={"a": "m"}),
        "m", 10 * GB, 0.0, ("a/0", Tier.PEER_RAM, "b", ()),
    ),
    (
        "the node with the file when none caches it",
        cluster([cdev("a/0"), cdev("b/0")], disk={"b": "m"}),
        "m", 10 * GB, 0.0, ("b/0", Tier.DISK, "b", ()),
    ),
    (
        "a peer's disk when the node with the file is busy",
        cluster([cdev("a/0", busy_until=9.0), cdev("b/0")], disk={"a": "m"}),
        "m", 10 * GB, 0.0, ("b/0", Tier.PEER_DISK, "a", ()),
    ),
    (
        "wait for a busy holder when that is sooner than a load",
        cluster([cdev("a/0", r("m", 10 * GB), busy_until=2.0), cdev("b/0")], disk={"b": "m"}),
        "m", 10 * GB, 1.0, ("a/0", Tier.VRAM, "", ()),
    ),
    (
        "load a copy beside a busy holder when that is sooner",
        cluster([cdev("a/0", r("m", 10 * GB), busy_until=30.0), cdev("b/0")], ram={"b": "m"}),
        "m", 10 * GB, 1.0, ("b/0", Tier.RAM, "b", ()),
    ),
    (
        "the most free budget where it fits as is",
        cluster([cdev("a/0", r("x", 40 * GB)), cdev("a/1", r("y", 20 * GB))], disk={"a": "m x y"}),
        "m", 30 * GB, 0.0, ("a/1", Tier.DISK, "a", ()),
    ),
    (
        "evict what is cheap to bring back (in the RAM cache), not the least recently used",
        cluster(
            [cdev("a/0", r("x", 70 * GB, 5.0)), cdev("a/1", r("y", 70 * GB, 1.0))],
            ram={"a": "m x"},
            disk={"a": "y"},
        ),
        "m", 20 * GB, 0.0, ("a/0", Tier.RAM, "a", ("x",)),
    ),
    (
        "leased models stay",
        cluster(
            [cdev("a/0", r("x", 70 * GB, 1.0, leased=True)), cdev("a/1", r("y", 70 * GB, 9.0))],
            ram={"a": "m x y"},
        ),
        "m", 20 * GB, 0.0, ("a/1", Tier.RAM, "a", ("y",)),
    ),
    (
        "every device busy: the one free soonest",
        cluster([cdev("a/0", busy_until=9.0), cdev("b/0", busy_until=4.0)], disk={"a": "m"}),
        "m", 10 * GB, 0.0, ("b/0", Tier.PEER_DISK, "a", ()),
    ),
    ("no node has the file", cluster([cdev("a/0")]), "m", GB, 0.0, "no node has its file"),
    ("bigger than every budget", cluster([cdev("a/0")], disk={"a": "m"}), "m", 81 * GB, 0.0, "more than the budget"),
    (
        "no room even after eviction",
        cluster([cdev("a/0", r("x", 70 * GB, leased=True))], disk={"a": "m"}),
        "m", 20 * GB, 0.0, "no device has room",
    ),
    ("no device at all", cluster([], disk={"a": "m"}), "m", GB, 0.0, "no worker is running"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "view", "model", "need", "now", "expected"), PLACE, ids=[c[0] for c in PLACE]
)
def test_choose_placement(
    case: str, view: ClusterView, model: str, need: int, now: float, expected: tuple[object, ...] | str
) -> None:
    if isinstance(expected, str):
        with pytest.raises(NotPlaceable, match=expected):
            choose_placement(view, model, need, now=now)
        return
    p = choose_placement(view, model, need, now=now)
    assert (p.device, p.tier, p.source, p.evict) == expected
    assert p.node == p.device.split("/")[0]


def test_cluster_view_follows_changes() -> None:
    """The indexes follow put/drop of devices, RAM and disk changes, and a lost node."""
    view = cluster([cdev("a/0"), cdev("b/0")], disk={"a": "m"})
    assert choose_placement(view, "m", GB).device == "a/0"
    view.put_device(cdev("a/0", busy_until=5.0))  # a's only device is now busy
    assert choose_placement(view, "m", GB).tier is Tier.PEER_DISK
    view.set_ram("b", "m", True)
    assert (choose_placement(view, "m", GB).device, choose_placement(view, "m", GB).tier) == ("b/0", Tier.RAM)
    view.put_device(cdev("b/0", r("m", GB)))
    assert view.holders("m") == {"b/0"}
    view.drop_node("b")
    assert view.holders("m") == set() and view.ram_nodes("m") == set()
    assert choose_placement(view, "m", GB).device == "a/0"  # the busy one, soonest free
    assert view.node("a") == NodeView("a", frozenset(), frozenset({"m"}))


def test_plan_eviction_by_value() -> None:
    """Given a value, the least valuable goes first, whatever its recency."""
    device = dev("a", 100, r("x", 40, 1.0), r("y", 40, 2.0))
    assert plan_eviction(device, "m", 50) == ["x"]
    assert plan_eviction(device, "m", 50, value=lambda res: -res.last_used) == ["y"]


# --- Parts shared by several placements on one device (docs/PARTS.md) ------------------------------


def shared(model: str, own: int, used: float, *parts: tuple[str, int]) -> Resident:
    """A model of ``own`` bytes plus its shared ``parts`` (share key, bytes)."""
    return Resident(model, own + sum(size for _, size in parts), used, shares=parts)


T5 = ("t5", 40)
VAE = ("vae", 10)
# x and y share the T5 and the VAE: the device holds 20 + 20 + 50, not 140
SHARING = (shared("x", 20, 1.0, T5, VAE), shared("y", 20, 2.0, T5, VAE))

SHARED_EVICT = [
    # (case, residents, budget, need, wants, expected)
    ("a shared part goes with its last holder only", SHARING, 100, 30, {}, ["x"]),
    ("a part freed once both go", SHARING, 100, 70, {}, ["x", "y"]),
    ("a part held already takes no room", SHARING, 100, 20 + 50, {"t5": 40, "vae": 10}, ["x"]),
    ("no eviction when the parts are there", SHARING, 100, 10 + 50, {"t5": 40, "vae": 10}, []),
    ("its holder evicted, the part needs its room again", (shared("x", 20, 1.0, T5),), 70, 20 + 40, {"t5": 40}, ["x"]),
    ("a part shared with the model counts once while its holder stays", (shared("x", 20, 1.0, T5),), 80, 20 + 40, {"t5": 40}, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "residents", "budget", "need", "wants", "expected"),
    SHARED_EVICT,
    ids=[c[0] for c in SHARED_EVICT],
)
def test_plan_eviction_counts_shared_parts_once(
    case: str,
    residents: tuple[Resident, ...],
    budget: int,
    need: int,
    wants: dict[str, int],
    expected: list[str],
) -> None:
    used = sum(r.bytes - sum(s for _, s in r.shares) for r in residents)
    used += sum({k: s for r in residents for k, s in r.shares}.values())
    device = DeviceView("a", budget, used, residents)
    assert plan_eviction(device, "m", need, wants=wants) == expected


def test_choose_device_prefers_room_counting_the_parts_held() -> None:
    """Device b holds the T5 the model wants: 30 bytes of its 70 are there already."""
    a = DeviceView("a", 100, 50, (r("z", 50),))
    b = DeviceView("b", 100, 60, (shared("x", 20, 1.0, T5),))
    assert choose_device([a, b], "m", 70, wants={"t5": 40}) == "b"
    assert choose_device([a, b], "m", 70) == "a"  # no share: neither fits, a frees more
    c = DeviceView("c", 100, 90, (shared("x", 50, 1.0, T5, VAE),))
    assert choose_device([c], "m", 60, wants={"t5": 40}) == "c"  # x evicted frees 100; the T5 counts again
