"""The placement policy on tables of cases: pure functions, no workers, no clock."""

from __future__ import annotations

import pytest

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView, Resident, choose_device, plan_eviction


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
    with pytest.raises(NotPlaceable, match="the budget of a is 100 bytes") as err:
        plan_eviction(dev("a", 100), "m", 101)
    assert err.value.details["required_bytes"] == 101
    with pytest.raises(NotPlaceable, match=r"leased, kept loaded or busy \(x, y\)") as err:
        plan_eviction(dev("a", 100, r("x", 40, leased=True), r("y", 40, keep_loaded=True)), "m", 50)
    assert err.value.details["held"] == ["x", "y"]
