"""A load of a model already loaded, or being loaded, on a device: the form check and the reload.

A load that asks for nothing the placement lacks is answered from it; one that asks for another
form (``forms.py``) is refused before any job (``LoadedDifferently``, 409) or, with ``reload``,
unloads the placement first and names the LoRAs that dropped. A load joining one in flight must ask
for that load's form (``pending``). ``Loads`` (``loads.py``) runs the loads; this is its check of
forms against the placements of one host. The cluster driver does the same on the forms its nodes
report (``cluster/loads.py``), with :func:`asked_form`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.forms import LoadForm, applied_loras, loaded_differently
from modelkeeper.orchestrator.jobs import Job
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.state import Placement, PlacementState, StateView
from modelkeeper.registry import ModelNotFound, ModelRecord


class Unload(Protocol):
    """How a reload unloads a placement: as an unload asked by a caller (leases honoured unless force)."""

    async def __call__(self, p: Placement, *, force: bool, timeout: float | None) -> dict[str, Any]: ...


@dataclass
class Settled:
    """What a load does about the placement its model has on its device already."""

    opts: LoadOptions  # the options to load with: a reload's completed by the placement's form
    answer: dict[str, Any] | None = None  # the placement as it is: the load asks for nothing new
    reloaded: dict[str, Any] | None = None  # the form of the placement a reload unloaded
    dropped: list[dict[str, Any]] = field(default_factory=list)  # the LoRAs applied to it


class Reloads:
    """The forms of one host's placements and loads in flight, checked against a load's options."""

    def __init__(self, catalog: Catalog, view: StateView, unload: Unload) -> None:
        self.catalog = catalog
        self.view = view
        self.unload = unload
        self.pending: dict[tuple[str, str], LoadForm] = {}  # the form each load in flight asks for

    async def check(self, record: ModelRecord, device: str | None, opts: LoadOptions) -> None:
        """LoadedDifferently when ``record`` is loaded, or being loaded, on ``device`` (any device
        when None) in another form than ``opts`` asks for (forms.py), naming the LoRAs a reload
        would drop there."""
        handles = await self.lora_handles(record)
        loras: dict[str, list[dict[str, Any]]] = {}
        forms = {d: f for (m, d), f in self.pending.items() if m == record.id}
        loading = set(forms)
        for p in self.view.of_model(record.id):
            if p.state is not PlacementState.UNLOADING:
                forms[p.device] = p.form
                loras[p.device] = applied_loras(p.loras, handles)
                if p.state is PlacementState.LOADED:
                    loading.discard(p.device)
        for where, form in sorted(forms.items()):
            differences = opts.differences(form)
            if differences and device in (None, where):
                raise loaded_differently(
                    record, where, form, differences, loading=where in loading, loras=loras.get(where, [])
                )

    async def settle(self, record: ModelRecord, device: str, opts: LoadOptions, job: Job) -> Settled:
        """The placement of ``record`` loaded on ``device``: the answer when ``opts`` asks for nothing
        it lacks (``keep_loaded`` and ``keep_alive`` updated), else refused, or with ``reload``
        unloaded (an option the reload leaves out keeps the placement's value)."""
        p = self.view.get(record.id, device)
        if p is None or p.state is not PlacementState.LOADED:
            return Settled(opts)
        if opts.reload:  # an option left out keeps its value: the reload changes only what it asks
            opts = replace(opts, **p.form.kept_by_reload(*asked_form(opts)))
        differences = opts.differences(p.form)
        if not differences:
            p.last_used = time.time()
            if opts.keep_loaded:
                p.keep_loaded = True
            if opts.keep_alive is not None:
                p.keep_alive = opts.keep_alive
            return Settled(opts, answer={**self.view.info(p), "already_loaded": True})
        dropped = applied_loras(p.loras, await self.lora_handles(record))
        if not opts.reload:
            raise loaded_differently(record, device, p.form, differences, loras=dropped)
        reloaded = p.form.info()
        job.start()  # the reload's unload is its first work
        job.progress(
            message=f"unloading {p.handle or record.handle}: loaded as {p.form.describe()}", force=True
        )
        await self.unload(p, force=opts.force, timeout=opts.timeout)
        return Settled(opts, reloaded=reloaded, dropped=dropped)

    def check_joining(self, record: ModelRecord, device: str, opts: LoadOptions) -> None:
        """LoadedDifferently when the load of ``record`` in flight on ``device`` asks for another form
        than ``opts``: joined, this load would get that form."""
        pending = self.pending.get((record.id, device), LoadForm())
        differences = opts.differences(pending)
        if differences:
            raise loaded_differently(record, device, pending, differences, loading=True)

    @contextmanager
    def asking(self, key: tuple[str, str], opts: LoadOptions) -> Iterator[None]:
        """Holds the form ``opts`` asks for as the form of the load ``key`` (model, device) in flight."""
        self.pending[key] = opts.form()
        try:
            yield
        finally:
            self.pending.pop(key, None)

    async def lora_handles(self, record: ModelRecord) -> dict[str, str]:
        """LoRA id -> handle of the LoRAs applied to ``record``'s placements (a LoRA gone from the
        registry is left out: named by its entry's name)."""
        handles: dict[str, str] = {}
        for lora_id in {k for p in self.view.of_model(record.id) for k in p.loras}:
            try:
                handles[lora_id] = (await self.catalog.get(lora_id)).handle
            except ModelNotFound:
                pass
        return handles


def asked_form(opts: LoadOptions) -> tuple[str | None, str | None, str | int | None]:
    """The dtype, storage dtype and offload ``opts`` asks for (None: left out), as ``LoadForm`` takes them."""
    return (
        None if opts.dtype is None else opts.dtype.value,
        None if opts.storage_dtype is None else opts.storage_dtype.value,
        opts.offload,
    )
