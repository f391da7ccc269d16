"""Cluster loads: a model onto a device of some node, off it again, leases, and routing.

``load`` resolves the model in the cluster catalog, asks the tiered placement
(:mod:`.placing`, the orchestrator's ``choose_placement`` fed the cluster state) for a
``node/device`` unless one is named, brings the model's file to that node
when it lacks it (:meth:`ClusterLoads.bring`: sent by a node that has it, chunked, checked by
hash, into its RAM cache), and forwards the load to that node's agent, which runs the
single-host load there (queue, priority, deadline, eviction, cache); the node's job progress and
the transfer's bytes stream into the driver's job as they happen. Concurrent loads of one model coalesce cluster-wide:
placement answers the device already loading it, and the second load joins the first. Leases are
the driver's, by cluster key; the ones on a device are passed to its agent with each load, so its
eviction honours them. Models loaded with ``keep_loaded`` are loaded again elsewhere when their
node is lost. ``route`` tells which node and device serve a model, loading it if asked.

A load of a model loaded, or being loaded, in another form (``dtype``, ``storage_dtype``,
``offload``: the orchestrator's ``forms.py``, fed the forms the nodes report) is refused before
any job with ``409 ALREADY_LOADED``, as on one host; with ``reload`` the driver unloads the
placement on its ``node/device`` (driver leases honoured unless ``force``) and loads it there again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from modelkeeper.cluster.catalog import ClusterCatalog, ClusterModel
from modelkeeper.cluster.errors import TransferFailed
from modelkeeper.cluster.membership import Membership
from modelkeeper.cluster.placing import choose_cluster_placement, tiered_view
from modelkeeper.cluster.receive import RECEIVED
from modelkeeper.cluster.settings import ClusterSettings
from modelkeeper.cluster.view import ClusterState, NodeState, device_id, split_device
from modelkeeper.orchestrator.coalesce import coalesced
from modelkeeper.orchestrator.errors import DeviceNotFound, ModelInUse, NotLoaded, NotPlaceable
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.forms import LoadForm, applied_loras, loaded_differently
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.loads import renaming
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.reload import asked_form
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.protocol.errors import ProtocolError


def naming_the_users_file(
    exc: ProtocolError, catalog: ClusterCatalog, node: str, *models: ClusterModel
) -> ProtocolError:
    """A node's error about a model it received into RAM only (its path on ``node`` lies under
    ``/dev/shm/modelkeeper-received-*``), naming the user's file instead, as ``node:path`` of a
    location the model was not received into; other errors are returned as they are. (The node
    itself names its path where its worker named a RAM-cache segment: ``loads.naming_the_users_file``.)"""
    known = catalog.models()
    for model in models:
        paths = {
            n: str(loc["path"]) for n, loc in known.get(model.key, model).locations.items() if loc["path"]
        }
        here = paths.get(node)
        origin = next(((n, p) for n, p in paths.items() if not p.startswith(RECEIVED)), None)
        if here is not None and here.startswith(RECEIVED) and origin is not None:
            exc = renaming(exc, here, origin[1], f"{origin[0]}:{origin[1]}")
    return exc


def error_in_cluster_terms(exc: ProtocolError, node: str, model: ClusterModel) -> ProtocolError:
    """A node's error with the cluster's names: its device ``node/device``, the model by its
    cluster key (in ``details``); a refusal the node made itself (a race the driver's own
    checks did not see) then reads as the driver's would."""
    device, local_id = exc.details.get("device"), model.locations.get(node, {}).get("model_id")
    if isinstance(device, str) and not device.startswith(node + "/"):
        exc.details["device"] = device_id(node, device)
        exc.message = exc.message.replace(f" on {device}", f" on {device_id(node, device)}")
        exc.args = (exc.message, *exc.args[1:])
    if local_id is not None and exc.details.get("model_id") == local_id:
        exc.details["model_id"] = model.key
    return exc


def progress(job: Job | None, values: dict[str, Any]) -> None:
    """A node's progress into the driver's job (when there is one), published every time: the
    node sends it at most every ``agent.PROGRESS_S``, and its last snapshot must not be dropped."""
    if job is not None:
        job.progress(**values, force=True)


class ClusterLoads:
    def __init__(
        self,
        settings: Settings,
        cluster: ClusterSettings,
        catalog: ClusterCatalog,
        members: Membership,
        view: ClusterState,
        leases: LeaseTable,
        jobs: JobManager,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.catalog = catalog
        self.members = members
        self.view = view
        self.leases = leases
        self.jobs = jobs
        self.bus = bus
        self.inflight: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.pending: dict[tuple[str, str], LoadForm] = {}  # the form each load in flight asks for
        self.kept: dict[str, LoadOptions] = {}  # cluster key -> the options of its keep-loaded load
        self._fetches: dict[tuple[str, str], asyncio.Future[str]] = {}
        #: Called with (model, source node, target node, its id there) once a file is received
        #: (set by the service: ``records.ClusterRecords.copy``, the user metadata goes along).
        self.on_received: Callable[[ClusterModel, str, str, str], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ placement

    def check_device(self, device: str) -> None:
        node, local = split_device(device)
        if not any(n.name == node and d["id"] == local for n, d in self.view.devices()):
            raise DeviceNotFound(
                f"no device {device!r} in the cluster (devices: "
                + ", ".join(device_id(n.name, d["id"]) for n, d in self.view.devices())
                + "); devices are named node/device",
                device=device,
            )

    def leased(self, key: str, device: str) -> bool:
        return bool(self.leases.holding(key, device))

    async def place(self, model: ClusterModel, opts: LoadOptions) -> str:
        """The ``node/device`` the tiered placement picks for ``model`` (the state refreshed first),
        counting its bytes as one host does (:meth:`demand`; with ``offload``, what stays resident)."""
        await self.members.refresh()
        need, wants = await self.demand(model, opts)
        view = tiered_view(self.view, self.leased, self.inflight)
        need = opts.resident_need(need, view.max_budget())
        return choose_cluster_placement(view, model.key, need, force=opts.force, wants=wants).device

    async def demand(self, model: ClusterModel, opts: LoadOptions) -> tuple[int, dict[str, int]]:
        """The bytes a load of ``model`` takes on a device, and of those its parts that a device
        holding them already takes no room for (share key -> bytes, docs/PARTS.md). A model
        completed from parts (a transformer-only Flux or SD3) is asked of the first node with its
        file (``NodeAgent.demand``: that node's own count, its parts included); any other model
        takes the bytes of its components, as its nodes list them."""
        node = next((n for n in sorted(model.locations) if n in self.members.links), None)
        if node is None or not model.info.get("with_parts"):
            return model.need, {}
        got = await self.members.link(node).call(
            "demand", model.local_id(node), opts, what=f"the bytes of {model.name} on {node}"
        )
        return int(got["need"]), {str(k): int(v) for k, v in got["shares"].items()}

    # ------------------------------------------------------------------ loading

    async def load(
        self,
        ref: str,
        device: str | None = None,
        *,
        all_devices: bool = False,
        options: LoadOptions | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Load a model on ``device``, on every device, or where placement puts it: a job."""
        opts = options or LoadOptions()
        model = await self.catalog.resolve(ref)
        if device is not None:
            self.check_device(device)
        if not opts.reload:  # loaded in another form: refused before any job (forms.py)
            self.check_form(model, None if all_devices else device, opts)
        params = {"model_id": model.key, "name": model.name, "device": device, "all_devices": all_devices}

        async def body(job: Job) -> Any:
            if all_devices:
                devices = [
                    device_id(n.name, d["id"]) for n, d in self.view.devices() if d["state"] == "ready"
                ]
                results = await asyncio.gather(*(self.load_on(model, d, opts, job) for d in devices))
                return {"model_id": model.key, "placements": list(results)}
            return await self.load_on(model, device or await self.place(model, opts), opts, job)

        return await self.jobs.run("load", params, body, wait=wait, timeout=opts.timeout)

    async def load_on(self, model: ClusterModel, device: str, opts: LoadOptions, job: Job) -> dict[str, Any]:
        """``model`` on ``device``: joined when a load of it there is in flight, else sent to its
        node; loaded there in another form, refused, or with ``reload`` unloaded first."""
        key = (model.key, device)
        node, local = split_device(device)
        reloaded: dict[str, Any] | None = None
        dropped: list[dict[str, Any]] = []
        if opts.reload:
            opts, reloaded, dropped = await self._reload(model, device, opts, job)
        if key in self.inflight:  # joined, it would get the form of the load in flight
            pending = self.pending.get(key, LoadForm())
            differences = opts.differences(pending)
            if differences:
                raise loaded_differently(model, device, pending, differences, loading=True)
        if opts.keep_loaded:
            self.kept[model.key] = dataclasses.replace(opts, reload=False)

        async def send() -> dict[str, Any]:
            try:
                local_id = await self.bring(model, node, job)
                job.progress(step="load", node=node, device=device, force=True)
                result = await self.members.link(node).stream(
                    "stream", "loads", "load", [local_id, local], {"options": opts},
                    (local, self.held_on(node, device)),
                    what=f"the load of {model.name} on {device}",
                    on_progress=lambda p: progress(job, {**p, "node": node, "device": device}),
                )  # fmt: skip
            except ProtocolError as exc:
                raise error_in_cluster_terms(
                    naming_the_users_file(exc, self.catalog, node, model), node, model
                ) from None
            finally:
                await self.members.refresh(node)
            out = self.in_cluster_terms(node, result)
            self.bus.publish("model.loaded", model_id=model.key, device=device, node=node, placement=out)
            return out

        starts = key not in self.inflight
        if starts:
            self.pending[key] = opts.form()
        try:
            result = await coalesced(self.inflight, key, job, f"the load of {model.key} on {device}", send)
        finally:
            if starts:
                self.pending.pop(key, None)
        if reloaded is None:
            return result
        return {**result, "reloaded": reloaded, "dropped_loras": dropped}

    async def _reload(
        self, model: ClusterModel, device: str, opts: LoadOptions, job: Job
    ) -> tuple[LoadOptions, dict[str, Any] | None, list[dict[str, Any]]]:
        """With ``reload``: ``opts`` with each option it leaves out kept as the placement of
        ``model`` on ``device`` has it (forms.py), that placement unloaded when loaded in another
        form than they ask for (as an unload: driver leases hold it unless ``force``); the form it
        had (None when there was nothing to unload) and the LoRAs the unload dropped."""
        await self.members.refresh(split_device(device)[0])  # its form as the node has it now
        p = next(
            (p for p in self.view.placements(model.key) if p["device"] == device and p["state"] == "loaded"),
            None,
        )
        if p is None:
            return opts, None, []
        form = next(f for d, _, f in self.view.forms(model.key) if d == device)
        opts = dataclasses.replace(opts, **form.kept_by_reload(*asked_form(opts)))
        if not opts.differences(form):
            return opts, None, []
        dropped = self._loras_of(p)
        job.progress(message=f"unloading {model.name} on {device}: loaded as {form.describe()}", force=True)
        await self._unload_checked(p, force=opts.force, timeout=opts.timeout)
        if not any(q["keep_loaded"] for q in self.view.placements(model.key)):
            self.kept.pop(model.key, None)  # kept again only if this load asks it
        return opts, form.info(), dropped

    def _loras_of(self, placement: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The LoRAs applied to a placement (in cluster terms), named by their handles (forms.py)."""
        if placement is None:
            return []
        handles = {k: m.handle for k, m in self.catalog.models().items()}
        return applied_loras(placement.get("loras", {}), handles)

    def check_form(self, model: ClusterModel, device: str | None, opts: LoadOptions) -> None:
        """LoadedDifferently when ``model`` is loaded, or being loaded, on ``device`` (any device
        when None) in another form than ``opts`` asks for (forms.py; the forms the nodes report
        and those of the driver's loads in flight)."""
        forms = {d: f for (k, d), f in self.pending.items() if k == model.key}
        loading = set(forms)
        for where, state, form in self.view.forms(model.key):
            if state != "unloading":
                forms[where] = form
                if state == "loaded":
                    loading.discard(where)
        for where, form in sorted(forms.items()):
            differences = opts.differences(form)
            if differences and device in (None, where):
                placed = next((p for p in self.view.placements(model.key) if p["device"] == where), None)
                raise loaded_differently(
                    model, where, form, differences, loading=where in loading, loras=self._loras_of(placed)
                )

    def in_cluster_terms(self, node: str, result: dict[str, Any]) -> dict[str, Any]:
        """A node's load result with the cluster's names (``NodeState.placement``): keys for model
        ids, ``node/device``."""
        view = self.view.nodes.get(node) or NodeState(node, "", {"models": []})
        return {
            **view.placement(result, result["device"]),
            "node": node,
            "evicted": [view.key_of(m) for m in result.get("evicted", [])],
        }

    def held_on(self, node: str, device: str) -> list[str]:
        """The local ids, on ``node``, of the models that driver leases hold on ``device``."""
        view = self.view.nodes.get(node)
        out = []
        for lease in self.leases.list():
            if lease.device in (None, device) and view is not None and (m := view.model(lease.model_id)):
                out.append(str(m["model_id"]))
        return out

    # ------------------------------------------------------------------ files between nodes

    async def bring(self, model: ClusterModel, node: str, job: Job | None) -> str:
        """The local id of ``model`` on ``node``, its file sent there first when the node lacks it."""
        if node in model.locations:
            return model.local_id(node)
        key = (model.key, node)
        running = self._fetches.get(key)
        if running is None:
            running = self._fetches[key] = asyncio.ensure_future(self._send(model, node, job))
            running.add_done_callback(lambda f: self._fetches.pop(key, None))
        return await asyncio.shield(running)

    async def _send(self, model: ClusterModel, node: str, job: Job | None) -> str:
        if model.key.startswith("name:"):
            raise TransferFailed(
                f"model {model.name} is not hashed on any node yet: it cannot be sent to {node} and checked",
                model_id=model.key,
            )
        sources = [n for n in model.locations if n in self.members.links]
        if not sources:
            raise NotPlaceable(f"no live node has the file of {model.name}", model_id=model.key)
        source = sources[0]
        link = self.members.link(source)
        what = f"sending {model.name} from {source} to {node}"
        if job is not None:
            job.progress(step="transfer", source=source, target=node, force=True)
        files = await link.call("files", model.local_id(source), what=what)
        started = time.perf_counter()
        got = await self.members.link(node).stream(
            "fetch", model.key, link.actor, model.local_id(source), files,
            self.cluster.chunk_bytes, self.cluster.chunks_in_flight, self.cluster.receive_to_disk,
            what=what, on_progress=lambda p: progress(job, {**p, "source": source}),
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if self.on_received is not None:
            await self.on_received(model, source, node, str(got["model_id"]))
        await self.members.refresh(node)
        self.bus.publish(
            "model.transferred", model_id=model.key, source=source, target=node, bytes=got["bytes"],
            seconds=got["seconds"], total_seconds=round(seconds, 6), to_disk=got["to_disk"],
            segments=len(got["segments"]),
        )  # fmt: skip
        return str(got["model_id"])

    async def transfer(self, ref: str, node: str, *, wait: bool = True) -> dict[str, Any]:
        """Send a model's file to ``node`` (from a node that has it): a job."""
        model = await self.catalog.resolve(ref)
        self.members.link(node)

        async def body(job: Job) -> Any:
            local_id = await self.bring(model, node, job)
            return {"model_id": model.key, "node": node, "local_id": local_id}

        return await self.jobs.run("transfer", {"model_id": model.key, "node": node}, body, wait=wait)

    # ------------------------------------------------------------------ unloading

    async def unload(
        self, ref: str, device: str | None = None, *, force: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        model = await self.catalog.resolve(ref)
        if device is not None:
            self.check_device(device)
        placements = [p for p in self.view.placements(model.key) if device in (None, p["device"])]
        if not placements:
            where = f"on {device}" if device else "on any device"
            raise NotLoaded(f"model {model.key} ({model.name}) is not loaded {where}", model_id=model.key)
        results = [await self._unload_checked(p, force=force, timeout=timeout) for p in placements]
        if device is None or not self.view.placements(model.key):
            self.kept.pop(model.key, None)
        return {"model_id": model.key, "handle": model.handle, "unloaded": results}

    async def unload_all(self, device: str | None = None, *, force: bool = False) -> dict[str, Any]:
        if device is not None:
            self.check_device(device)
        unloaded, refused = [], []
        for p in self.view.placements():
            if device not in (None, p["device"]):
                continue
            try:
                unloaded.append(await self._unload_checked(p, force=force, timeout=None))
                self.kept.pop(p["model_id"], None)
            except ModelInUse as exc:
                refused.append(
                    {
                        "model_id": p["model_id"],
                        "handle": p["handle"],
                        "device": p["device"],
                        "error": exc.message,
                    }
                )
        return {"unloaded": unloaded, "refused": refused}

    async def _unload_checked(
        self, p: dict[str, Any], *, force: bool, timeout: float | None
    ) -> dict[str, Any]:
        leases = self.leases.holding(p["model_id"], p["device"])
        if leases and not force:
            raise ModelInUse(
                f"model {p['model_id']} on {p['device']} is held by {len(leases)} lease(s); release them or pass force",
                leases=[lease.id for lease in leases],
                model_id=p["model_id"],
                device=p["device"],
            )
        if force:
            self.leases.revoke(p["model_id"], p["device"])
        node, local = split_device(p["device"])
        try:
            result = await self.members.link(node).call(
                "unload",
                p["local_id"],
                local,
                force,
                timeout,
                what=f"the unload of {p['model_id']} on {p['device']}",
            )
        finally:
            await self.members.refresh(node)
        freed = sum(u.get("freed_bytes", 0) for u in result["unloaded"])
        self.bus.publish("model.unloaded", model_id=p["model_id"], device=p["device"], freed_bytes=freed)
        return {"model_id": p["model_id"], "handle": p["handle"], "device": p["device"], "freed_bytes": freed}

    # ------------------------------------------------------------------ leases

    async def grant_lease(
        self, ref: str, device: str | None, holder: str, ttl: float | None
    ) -> dict[str, Any]:
        """Hold a model (on ``device`` or anywhere): neither evicted nor unloaded without force."""
        model = await self.catalog.resolve(ref)
        if device is not None:
            self.check_device(device)
        lease = self.leases.grant(model.key, device, holder, ttl or self.settings.lease_ttl)
        self.bus.publish("lease.granted", lease=lease.info())
        return lease.info()

    def release_lease(self, lease_id: str) -> dict[str, Any]:
        lease = self.leases.release(lease_id)
        self.bus.publish("lease.released", lease=lease.info())
        return lease.info()

    # ------------------------------------------------------------------ routing

    async def route(
        self, ref: str, *, load: bool = False, options: LoadOptions | None = None
    ) -> dict[str, Any]:
        """Which node and device serve ``ref`` now (the most recently used loaded placement);
        with ``load``, loading it first where placement says when it is loaded nowhere."""
        model = await self.catalog.resolve(ref)
        loaded = [p for p in self.view.placements(model.key) if p["state"] == "loaded"]
        if not loaded and load:
            result = (await self.load(model.key, options=options, wait=True))["result"]
            loaded = [p for p in self.view.placements(model.key) if p["state"] == "loaded"] or [result]
        out: dict[str, Any] = {
            "model_id": model.key,
            "name": model.name,
            "loaded": bool(loaded),
            "node": None,
            "device": None,
            "placements": [
                {"node": p["node"], "device": p["device"], "state": p["state"]}
                for p in self.view.placements(model.key)
            ],
            "ram_nodes": self.view.nodes_with_ram(model.key),
            "disk_nodes": self.view.nodes_with_disk(model.key),
        }
        if loaded:
            best = max(loaded, key=lambda p: p.get("last_used") or 0)
            out.update(node=best["node"], device=best["device"])
        return out

    # ------------------------------------------------------------------ node loss

    async def replace_kept(self, node: str, gone: list[dict[str, Any]]) -> None:
        """After ``node`` is lost: its driver leases end, and every kept model loaded nowhere now is
        loaded again where placement puts it (one job each, not awaited)."""
        for lease in self.leases.list():
            if lease.device is not None and split_device(lease.device)[0] == node:
                self.leases.revoke(lease.model_id, lease.device)
        for key, opts in list(self.kept.items()):
            if any(p["state"] in ("loaded", "loading") for p in self.view.placements(key)):
                continue
            try:
                await self.load(key, options=opts, wait=False)
                self.bus.publish("model.replacing", model_id=key, lost_node=node)
            except Exception as exc:
                self.bus.publish("model.replace_failed", model_id=key, lost_node=node, error=str(exc))
