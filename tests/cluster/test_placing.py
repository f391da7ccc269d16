"""Cluster placement on tables of cases: agent states as the driver holds them, through the tiered
policy (``choose_placement``) and back to ``node/device`` names. Pure, no Ray."""

from __future__ import annotations

from typing import Any

import pytest

from modelkeeper.cluster.keys import cluster_share
from modelkeeper.cluster.placing import SENT_FILES, choose_cluster_placement, tiered_view
from modelkeeper.cluster.view import ClusterState
from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.tiers import Tier

MB = 1_000_000


def device(
    local: str,
    budget: int,
    *residents: tuple[str, int, float],
    kept: str = "",
    ready: bool = True,
    shares: dict[str, list[tuple[str, int]]] | None = None,
) -> dict[str, Any]:
    """One device of an agent's ``state()``: residents are (model, MB, last used); ``shares``:
    model -> (share key, MB) of the parts it holds once with the others holding them (of its MB)."""
    held = shares or {}
    placements = [
        {"model_id": m, "bytes": b * MB, "last_used": used, "state": "loaded", "keep_loaded": m in kept.split(),
         "leases": 0, "shares": [(k, size * MB) for k, size in held.get(m, [])]}
        for m, b, used in residents
    ]  # fmt: skip
    once = {k: size for p in placements for k, size in p["shares"]}
    used = sum(p["bytes"] - sum(size for _, size in p["shares"]) for p in placements) + sum(once.values())
    return {"id": local, "state": "ready" if ready else "starting", "budget": budget * MB, "used": used,
            "placements": placements}  # fmt: skip


def state(nodes: dict[str, list[dict[str, Any]]], disk: str = "", ram: str = "") -> ClusterState:
    """A cluster state: ``disk``/``ram`` are ``node:model`` words (its file there; bytes of it in
    the node's RAM cache). Local ids equal cluster keys, as for models hashed alike on every node."""
    on_disk = [w.split(":") for w in disk.split()]
    cached = {tuple(w.split(":")) for w in ram.split()}
    out = ClusterState()
    for name, devices in nodes.items():
        models = [
            {"key": m, "model_id": m, "ram_bytes": MB if (name, m) in cached else 0}
            for n, m in on_disk
            if n == name
        ]
        out.update(name, f"id-{name}", {"devices": devices, "models": models})
    return out


def never_leased(key: str, device: str) -> bool:
    return False


CASES = [
    # (case, cluster state, need MB, expected device, tier)
    ("vram holder first", state({"a": [device("cpu", 100)], "b": [device("cpu", 100, ("m", 10, 0))]}, "a:m b:m"),
     10, "b/cpu", Tier.VRAM),
    ("ram before disk", state({"a": [device("cpu", 100)], "b": [device("cpu", 100, ("x", 50, 0))]}, "a:m b:m", "b:m"),
     10, "b/cpu", Tier.RAM),
    ("disk before room", state({"a": [device("cpu", 100, ("x", 50, 0))], "b": [device("cpu", 100)]}, "a:m"),
     10, "a/cpu", Tier.DISK),
    ("full ram node passed over, a peer sends it",
     state({"a": [device("cpu", 100, ("x", 95, 0), kept="x")], "b": [device("cpu", 100)]}, "a:m", "a:m"),
     10, "b/cpu", Tier.PEER_RAM),
    ("own disk before a roomier node fed from a peer's RAM cache (files are sent, not streamed)",
     state({"a": [device("cpu", 100)], "c": [device("cpu", 100, ("x", 95, 0), kept="x")], "d": [device("cpu", 200)]},
           "a:m c:m", "c:m"),
     10, "a/cpu", Tier.DISK),
    ("most room within a tier",
     state({"a": [device("cpu", 100, ("x", 60, 0)), device("cuda:0", 100, ("y", 20, 0))], "b": [device("cpu", 100)]},
           "a:m"),
     30, "a/cuda:0", Tier.DISK),
    ("least valuable victim: the least recently used",
     state({"a": [device("cpu", 100, ("x", 95, 5.0))], "b": [device("cpu", 100, ("y", 90, 1.0))]}, "a:m b:m"),
     30, "b/cpu", Tier.DISK),
    ("kept loaded stays", state({"a": [device("cpu", 100, ("x", 95, 0.0), kept="x")], "b": [device("cpu", 100, ("y", 90, 9.0))]}, "a:m b:m"),
     30, "b/cpu", Tier.DISK),
    ("a device not ready is passed over",
     state({"a": [device("cpu", 100, ready=False)], "b": [device("cpu", 100, ("x", 10, 0))]}, "a:m b:m", "a:m"),
     10, "b/cpu", Tier.DISK),
]  # fmt: skip


@pytest.mark.parametrize(("case", "cluster", "need", "expected", "tier"), CASES, ids=[c[0] for c in CASES])
def test_tiers(case: str, cluster: ClusterState, need: int, expected: str, tier: Tier) -> None:
    got = choose_cluster_placement(tiered_view(cluster, never_leased), "m", need * MB)
    assert (got.device, got.node, got.tier) == (expected, expected.split("/", maxsplit=1)[0], tier)


def test_eviction_plan_in_cluster_keys() -> None:
    cluster = state({"a": [device("cpu", 100, ("x", 60, 1.0), ("y", 30, 2.0))]}, "a:m a:x a:y")
    got = choose_cluster_placement(tiered_view(cluster, never_leased), "m", 50 * MB)
    assert (got.device, got.evict) == ("a/cpu", ("x",))


def test_driver_leases_hold() -> None:
    cluster = state(
        {"a": [device("cpu", 100, ("x", 95, 0.0))], "b": [device("cpu", 100, ("y", 90, 9.0))]}, "a:m b:m"
    )
    view = tiered_view(cluster, lambda key, dev: (key, dev) == ("x", "a/cpu"))
    assert choose_cluster_placement(view, "m", 30 * MB).device == "b/cpu"
    assert choose_cluster_placement(view, "m", 30 * MB, force=True).device == "a/cpu"


def test_a_load_in_flight_is_joined() -> None:
    cluster = state({"a": [device("cpu", 100)], "b": [device("cpu", 100)]}, "a:m", "a:m")
    got = choose_cluster_placement(tiered_view(cluster, never_leased, [("m", "b/cpu")]), "m", 10 * MB)
    assert (got.device, got.tier) == ("b/cpu", Tier.VRAM)


def test_the_view_prices_sent_files() -> None:
    assert tiered_view(ClusterState(), never_leased).bandwidths == SENT_FILES
    assert SENT_FILES.seconds(Tier.PEER_RAM, 10**9) >= SENT_FILES.seconds(Tier.DISK, 10**9)


def test_nothing_fits_names_every_device() -> None:
    cluster = state(
        {"a": [device("cpu", 100, ("x", 95, 0), kept="x")], "b": [device("cpu", 60)]}, "a:m b:m", "a:m"
    )
    with pytest.raises(
        NotPlaceable, match=r"a/cpu: 5000000 of 100000000 bytes free, held by x; b/cpu"
    ) as err:
        choose_cluster_placement(tiered_view(cluster, never_leased), "m", 80 * MB)
    assert err.value.details["devices"] == {"a/cpu": 5 * MB, "b/cpu": 60 * MB}


def test_no_ready_device() -> None:
    cluster = state({"a": [device("cpu", 100, ready=False)]}, "a:m")
    with pytest.raises(NotPlaceable, match="no node of the cluster has a ready device"):
        choose_cluster_placement(tiered_view(cluster, never_leased), "m", 10 * MB)


def test_a_part_held_on_a_device_takes_no_room_there() -> None:
    """Node a's device holds x (20 MB of its own and a 40 MB T5, kept loaded); m (30 MB and the same
    T5) needs room there for its 30 MB only. Counted in full it fits nowhere."""
    t5 = {"x": [("t5", 40)]}
    a = device("cpu", 100, ("x", 60, 0), kept="x", shares=t5)
    cluster = state({"a": [a], "b": [device("cpu", 100, ("y", 50, 0), kept="y")]}, "a:m b:m")
    view = tiered_view(cluster, never_leased)
    got = choose_cluster_placement(view, "m", 70 * MB, wants={"t5": 40 * MB})
    assert (got.device, got.tier, got.evict) == ("a/cpu", Tier.DISK, ())
    with pytest.raises(NotPlaceable):
        choose_cluster_placement(view, "m", 70 * MB)


def test_a_shared_part_is_freed_with_its_last_holder_only() -> None:
    """x and z share a 40 MB T5 (the device holds 20 + 10 + 40 MB): evicting x frees its own 20 MB,
    not 60; to free 60 both go."""
    both = {"x": [("t5", 40)], "z": [("t5", 40)]}
    cluster = state({"a": [device("cpu", 100, ("x", 60, 1.0), ("z", 50, 2.0), shares=both)]}, "a:m a:x a:z")
    view = tiered_view(cluster, never_leased)
    assert view.device("a/cpu").used == 70 * MB
    assert choose_cluster_placement(view, "m", 50 * MB).evict == ("x",)
    assert choose_cluster_placement(view, "m", 60 * MB).evict == ("x", "z")


def test_share_keys_in_cluster_terms() -> None:
    """A node's share key names its part by the node's id; the driver's, by the part's cluster key,
    so that a load's parts computed on one node match those held on another's devices."""
    form = "abc|text_encoder|file|file"
    assert cluster_share(f"m-1:{form}", {"m-1": "K"}, "a") == f"K:{form}"
    assert cluster_share(f"m-2:{form}", {"m-1": "K"}, "a") == f"a/m-2:{form}"  # unknown here: its own
