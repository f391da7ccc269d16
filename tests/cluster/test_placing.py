"""The tiered cluster placement on tables of cases: pure, no Ray."""

from __future__ import annotations

import pytest

from modelkeeper.cluster.placing import choose_cluster_device
from modelkeeper.cluster.view import split_device
from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView, Resident

MB = 1_000_000


def dev(id: str, budget: int, *residents: tuple[str, int], kept: tuple[str, ...] = ()) -> DeviceView:
    rs = tuple(Resident(m, b * MB, 0.0, keep_loaded=m in kept) for m, b in residents)
    return DeviceView(id, budget * MB, sum(r.bytes for r in rs), rs)


def node_of(device: str) -> str:
    return split_device(device)[0]


CASES = [
    # (devices, need MB, ram nodes, disk nodes, expected)
    pytest.param([dev("a/cpu", 100), dev("b/cpu", 100, ("m", 10))], 10, [], ["a"], "b/cpu", id="vram-holder-first"),
    pytest.param([dev("a/cpu", 100), dev("b/cpu", 100, ("x", 50))], 10, ["b"], ["a", "b"], "b/cpu", id="ram-before-disk"),
    pytest.param([dev("a/cpu", 100, ("x", 50)), dev("b/cpu", 100)], 10, [], ["a"], "a/cpu", id="disk-before-room"),
    pytest.param(
        [dev("a/cpu", 100, ("x", 95), kept=("x",)), dev("b/cpu", 100)], 10, ["a"], ["a"], "b/cpu",
        id="full-ram-node-passed-over",
    ),
    pytest.param(
        [dev("a/cpu", 100, ("x", 60)), dev("a/cuda:0", 100, ("y", 20)), dev("b/cpu", 100)], 30, [], ["a"],
        "a/cuda:0", id="most-room-within-a-tier",
    ),
    pytest.param(
        [dev("a/cpu", 100, ("x", 95)), dev("b/cpu", 100, ("y", 90))], 30, [], [], "a/cpu",
        id="most-room-after-eviction",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("devices", "need", "ram", "disk", "expected"), CASES)
def test_tiers(devices: list[DeviceView], need: int, ram: list[str], disk: list[str], expected: str) -> None:
    got = choose_cluster_device(devices, node_of, "m", need * MB, ram_nodes=ram, disk_nodes=disk)
    assert got == expected


def test_nothing_fits_names_every_device() -> None:
    devices = [dev("a/cpu", 100, ("x", 95), kept=("x",)), dev("b/cpu", 20)]
    with pytest.raises(NotPlaceable, match="a/cpu"):
        choose_cluster_device(devices, node_of, "m", 50 * MB, ram_nodes=["a"], disk_nodes=["a", "b"])
