"""Placement on one host: which device takes a model, and which models make room for it. A pure policy.

Functions of a :class:`DeviceView` list, with no I/O and no clock: the load path builds the views
from its workers, placements and leases, asks, and acts on the answer elsewhere (the loads part).
Errors are :class:`NotPlaceable`, whose message says what holds each device.

The order, for :func:`choose_device`: the device already holding (or loading) the model; else the
one with the most free budget that fits it; else the one with the most room once its evictable
models (loaded, not leased, not kept loaded, unless ``force``) are gone. :func:`plan_eviction`
picks, on one device, the least recently used evictable models until the model fits (or, given
``value``, the least valuable ones).

Parts shared by several placements on a device (docs/PARTS.md) are counted once: a resident's
``shares`` name them with their bytes; unloading a resident frees a shared part only with the last
of its holders, and a model to place that ``wants`` a part a staying resident holds needs no room
for it.

A cluster adds tiers (a node's RAM cache, its disk, a peer): :mod:`.tiers` holds the cluster as
that policy sees it, :mod:`.placement_tiers` the policy, built on these views and
:func:`plan_eviction`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.sizes import format_size

#: What a 507 for a model larger than every budget suggests: a load that streams what does not fit.
STREAM_IT = "load it with offload auto (--offload auto) to keep what fits on the device and stream the rest"


@dataclass(frozen=True)
class Resident:
    """A model on a device, as placement sees it."""

    model_id: str
    bytes: int
    last_used: float
    loaded: bool = True  # False while loading or unloading: never evicted
    leased: bool = False
    keep_loaded: bool = False
    #: (share key, bytes) of its parts that other placements may hold too; part of ``bytes``
    shares: tuple[tuple[str, int], ...] = ()
    handle: str = ""  # what messages name it by (the model id when empty)

    @property
    def shown(self) -> str:
        return self.handle or self.model_id

    def evictable(self, force: bool) -> bool:
        return self.loaded and (force or not (self.leased or self.keep_loaded))


@dataclass(frozen=True)
class DeviceView:
    """One ready device: its budget, the bytes its models use, and what is on it."""

    id: str
    budget: int
    used: int
    residents: tuple[Resident, ...] = field(default_factory=tuple)
    loading: frozenset[str] = frozenset()  # model ids being loaded there now
    node: str = ""  # the host it belongs to, in a cluster
    busy_until: float = 0.0  # when the work queued on it ends, on the caller's clock; 0: idle

    @property
    def free(self) -> int:
        return self.budget - self.used

    def holds(self, model_id: str) -> bool:
        return model_id in self.loading or any(r.model_id == model_id for r in self.residents)

    def evictable(self, force: bool, keep: str) -> list[Resident]:
        """Models that may go to make room for ``keep``, least recently used first."""
        out = [r for r in self.residents if r.model_id != keep and r.evictable(force)]
        return sorted(out, key=lambda r: r.last_used)


def freed_by(residents: Sequence[Resident], chosen: Collection[Resident]) -> int:
    """Bytes that unloading ``chosen`` frees: their own, and each shared part none of ``residents``
    that stays holds."""
    staying = _held(r for r in residents if r not in chosen)
    parts = {key: size for r in chosen for key, size in r.shares if key not in staying}
    return sum(r.bytes - sum(size for _, size in r.shares) for r in chosen) + sum(parts.values())


def held_already(residents: Sequence[Resident], gone: Collection[Resident], wants: Mapping[str, int]) -> int:
    """Bytes of ``wants`` (share key -> bytes: the parts of the model to place) that a resident
    not in ``gone`` holds: the model shares them, they take no more room."""
    staying = _held(r for r in residents if r not in gone)
    return sum(size for key, size in wants.items() if key in staying)


def _held(residents: Iterable[Resident]) -> set[str]:
    return {key for r in residents for key, _ in r.shares}


def choose_device(
    devices: Sequence[DeviceView],
    model_id: str,
    need: int,
    *,
    force: bool = False,
    wants: Mapping[str, int] | None = None,
    name: str = "",
) -> str:
    """The id of the device that should load ``model_id`` (``need`` bytes, of which ``wants``: its
    shareable parts by share key; ``name``: what messages call it, its id when empty); see the
    module docstring."""
    if not devices:
        raise NotPlaceable("no worker is running", required_bytes=need)
    for d in devices:
        if d.holds(model_id):
            return d.id
    name = name or model_id
    if all(d.budget < need for d in devices):
        budgets = {d.id: d.budget for d in devices}
        raise NotPlaceable(
            f"{name} needs {format_size(need)}, more than the budget of any device ("
            + ", ".join(f"{d}: {format_size(b)}" for d, b in budgets.items())
            + f"); {STREAM_IT}",
            required_bytes=need,
            budgets=budgets,
        )
    wants = wants or {}
    fits = [d for d in devices if d.free + held_already(d.residents, (), wants) >= need]
    if fits:
        return max(fits, key=lambda d: d.free).id
    after = {}
    for d in devices:
        gone = d.evictable(force, model_id)
        after[d.id] = d.free + freed_by(d.residents, gone) + held_already(d.residents, gone, wants)
    room = [d for d in devices if after[d.id] >= need]
    if room:
        return max(room, key=lambda d: after[d.id]).id
    kept = {
        d.id: [r for r in d.residents if r.model_id != model_id and not r.evictable(force)] for d in devices
    }
    held = {d: [r.model_id for r in rs] for d, rs in kept.items()}
    raise NotPlaceable(
        f"{name} needs {format_size(need)}; no device has room even after evicting the models "
        "that are not leased or kept loaded ("
        + "; ".join(
            f"{d.id}: {format_size(after[d.id])}, held by {', '.join(r.shown for r in kept[d.id]) or 'nothing'}"
            for d in devices
        )
        + "); unload a model, release its lease, or pass force",
        required_bytes=need,
        devices=after,
        held=sorted({m for ms in held.values() for m in ms}),
    )


def plan_eviction(
    device: DeviceView,
    model_id: str,
    need: int,
    *,
    force: bool = False,
    value: Callable[[Resident], float] | None = None,
    wants: Mapping[str, int] | None = None,
    name: str = "",
) -> list[str]:
    """The models to unload from ``device`` so that ``model_id`` (``need`` bytes, of which
    ``wants``: its shareable parts by share key; ``name``: what messages call it) fits; empty when
    it fits already. Least recently used first, or, given ``value``, least valuable first (ties by
    recency)."""
    name = name or model_id
    if need > device.budget:
        raise NotPlaceable(
            f"{name} needs {format_size(need)}; the budget of {device.id} is {format_size(device.budget)}; "
            + STREAM_IT,
            required_bytes=need,
            budget_bytes=device.budget,
            device=device.id,
        )
    wanted = wants or {}

    def over(chosen: list[Resident]) -> int:
        kept = held_already(device.residents, chosen, wanted)
        return device.used + need - kept - freed_by(device.residents, chosen) - device.budget

    if over([]) <= 0:
        return []
    chosen: list[Resident] = []
    candidates = device.evictable(force, model_id)
    if value is not None:
        candidates.sort(key=value)
    for r in candidates:
        if over(chosen) <= 0:
            break
        chosen.append(r)
    if over(chosen) > 0:
        others = [r for r in device.residents if r not in chosen and r.model_id != model_id]
        held = [r.model_id for r in others]
        raise NotPlaceable(
            f"{name} needs {format_size(need)} on {device.id}: {format_size(device.free)} free of "
            f"{format_size(device.budget)}, and the other models there are leased, kept loaded or busy "
            f"({', '.join(r.shown for r in others) or 'none'}); "
            "unload one, release its lease, or pass force",
            required_bytes=need,
            free_bytes=device.free,
            device=device.id,
            held=held,
        )
    return [r.model_id for r in chosen]
