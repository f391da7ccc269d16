"""Cluster mode on a local multi-node Ray cluster: a head and one Ray node per modelkeeper node,
each with its own resource, model root, registry, RAM cache and CPU worker (in the agent's
process: the same protocol). One cluster for the module; each test leaves no model loaded.
Moments of contention and of faults are made by the test: a gate holds a device's queue."""

from __future__ import annotations

import asyncio
import filecmp
import shutil
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from typer.testing import CliRunner

from modelkeeper.cli.app import app as cli
from modelkeeper.client import ApiError, Client
from modelkeeper.cluster import ClusterOrchestrator, ClusterSettings
from modelkeeper.cluster.settings import AGENT_PREFIX
from modelkeeper.orchestrator import Settings
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.cluster import GatedAgent, LocalCluster, local_ray_cluster
from modelkeeper.testing.hubserver import FakeHub
from modelkeeper.testing.service import RunningService, running_service

pytestmark = [pytest.mark.xdist_group("ray-cluster"), pytest.mark.slow]

MiB = 1 << 20
CKPT = "checkpoints/tiny-sd15.safetensors"  # node-a only, 8.7 MB
SD15 = "diffusers/tiny-sd15"  # node-b only, 8.7 MB
CLIP_L = "clip/tiny-clip-l.safetensors"  # node-a and node-b, 6 MB
UNET = "unet/tiny-sd15-unet.safetensors"  # node-a only: sent to node-b by a test
LORA = "loras/tiny-sd15-kohya.safetensors"  # node-a only: sent to node-b to patch SD15 there
FLUX = "transformer/tiny-flux.safetensors"  # written on node-a and node-b by a test
PEFT = "tiny-sd15-peft.safetensors"  # on the fake Hub only: installed onto a node by a test
LAYOUT = {"node-a": [CKPT, CLIP_L, UNET, LORA], "node-b": [SD15, CLIP_L], "node-c": [CLIP_L]}
T = TypeVar("T")


@dataclass
class Fleet:
    lc: LocalCluster
    svc: RunningService
    orch: ClusterOrchestrator
    roots: dict[str, Path]

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60) -> T:
        """A coroutine on the driver's loop (the service's), from the test's thread."""
        loop = self.orch.bus._loop
        assert loop is not None
        return asyncio.run_coroutine_threadsafe(make(), loop).result(timeout)

    def client(self) -> Client:
        return Client(self.svc.url)

    def events(self, type: str) -> list[dict[str, Any]]:
        return [e for e in list(self.orch.bus.recent) if e["type"] == type]

    def actor(self, node: str) -> Any:
        return self.orch.members.link(node).actor


def until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def node_settings(root: Path, folder: Path, hub: str) -> dict[str, Any]:
    return {
        "model_roots": [str(root)],
        "hub_endpoint": hub,
        "db": str(folder / "registry.sqlite3"),
        "devices": ["cpu"],
        "ram_cache_bytes": 64 * MiB,
        "worker_budget_mb": 30,
        "worker_warm": False,
        "status_poll_s": 60,
    }


def node_metadata(fleet: Fleet, node: str, model: dict[str, Any]) -> dict[str, Any]:
    """The user metadata in ``node``'s own registry, read from its agent."""
    import ray

    local = model["nodes"][node]["model_id"]
    answer: dict[str, Any] = ray.get(fleet.actor(node).call.remote("catalog", "metadata", [local], {}))
    return dict(answer["ok"])


@pytest.fixture(scope="module")
def hub(demo: DemoManifest) -> Iterator[FakeHub]:
    """The fake Hub the nodes install from: one LoRA no node has."""
    with FakeHub() as server:
        server.add_repo("tiny/lora", {PEFT: demo.root / "loras" / PEFT})
        yield server


@pytest.fixture(scope="module")
def fleet(demo: DemoManifest, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    import ray

    roots, overrides = {}, {}
    for node, paths in LAYOUT.items():
        folder = tmp_path_factory.mktemp(node)
        root = roots[node] = folder / "models"
        for rel in paths:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            src = demo.root / rel
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / rel)
        overrides[node] = node_settings(root, folder, hub.url)
    with local_ray_cluster(["node-a", "node-b"]) as lc:
        cluster = ClusterSettings(
            address=lc.address, workers="inprocess", named_nodes_only=True, node_poll_s=0.1,
            refresh_s=0.5, node_overrides=overrides,
        )  # fmt: skip
        orch = ClusterOrchestrator(Settings(port=0), cluster, agent_class=GatedAgent)
        try:
            with running_service(Settings(port=0), service=orch) as svc:
                yield Fleet(lc, svc, orch, roots)
        finally:
            for node in LAYOUT:
                try:
                    agent = ray.get_actor(AGENT_PREFIX + node, namespace=cluster.namespace)
                except ValueError:
                    continue
                try:
                    ray.get(agent.stop.remote(), timeout=60)
                except ray.exceptions.RayError:
                    pass  # a node killed by a test: its agent is gone
                finally:
                    ray.kill(agent)


@pytest.fixture
def client(fleet: Fleet) -> Iterator[Client]:
    with fleet.client() as c:
        yield c
        c.unload_all(force=True)


def test_placement_by_bytes_and_routing(fleet: Fleet, client: Client) -> None:
    status = client.status()
    assert {d["id"] for d in status["devices"]} == {"node-a/cpu", "node-b/cpu"}
    assert {n["name"] for n in status["nodes"]} == {"node-a", "node-b"}
    # a model on one node's disk goes to that node
    sd15 = client.load(SD15)["result"]
    assert sd15["device"] == "node-b/cpu" and sd15["node"] == "node-b"
    # on both disks: the device with the most room (node-a is empty, node-b holds 8.7 MB)
    clip = client.load(CLIP_L)["result"]
    assert clip["device"] == "node-a/cpu"
    assert clip["model_id"] == client.model(CLIP_L)["id"]  # the cluster key: its content hash
    assert len(clip["model_id"]) == 64
    # routing answers the warm device; with load=true a cold model is loaded where its file is
    assert client.route(CLIP_L)["device"] == "node-a/cpu"
    assert client.route(SD15)["device"] == "node-b/cpu"
    cold = client.route(CKPT)
    assert not cold["loaded"] and cold["disk_nodes"] == ["node-a"]
    assert client.route(CKPT, load=True)["device"] == "node-a/cpu"
    # already loaded: placement answers the device holding it, nothing is loaded twice
    again = client.load(CLIP_L)["result"]
    assert again["device"] == "node-a/cpu" and again["already_loaded"]
    # the model list names every node holding a model, and where it is loaded
    listed = {m["name"]: m for m in client.list_models(limit=100)["items"]}
    assert set(listed["tiny-clip-l"]["nodes"]) == {"node-a", "node-b"}
    assert listed["tiny-clip-l"]["loaded_on"] == ["node-a/cpu"]
    # a lease holds a model cluster-wide: no unload without force
    lease = client.lease(CLIP_L, device="node-a/cpu", holder="test")
    with pytest.raises(ApiError) as refused:
        client.unload(CLIP_L)
    assert refused.value.error_code == "BUSY"
    client.release_lease(lease["id"])


def test_loads_of_one_model_coalesce_cluster_wide(fleet: Fleet, client: Client) -> None:
    import ray

    for node in ("node-a", "node-b"):
        ray.get(fleet.actor(node).gate.remote("cpu"))
    jobs = [client.load(CLIP_L, wait=False)["job"] for _ in range(4)]
    until(lambda: fleet.orch.loads.inflight, what="a load in flight")
    for node in ("node-a", "node-b"):
        ray.get(fleet.actor(node).let_go.remote("cpu"))
    done = [client.wait_job(j["id"], timeout=60) for j in jobs]
    assert all(j["state"] == "succeeded" for j in done)
    assert len({j["result"]["device"] for j in done}) == 1
    assert sum(1 for j in done if j["result"].get("coalesced")) == 3


def test_a_cancelled_cluster_load_is_cancelled_on_its_node(fleet: Fleet, client: Client) -> None:
    import ray

    actor = fleet.actor("node-b")
    ray.get(actor.gate.remote("cpu"))
    try:
        job = client.load(SD15, wait=False)["job"]
        until(lambda: ray.get(actor.queued.remote("cpu")) >= 1, what="the load queued on node-b")
        client.cancel_job(job["id"])
        # the node's own job is cancelled too, while the gate still holds its device
        states = lambda: ray.get(actor.job_states.remote("load"))  # noqa: E731
        until(lambda: states()[0] == "cancelled", 10, "the node's load cancelled")
    finally:
        ray.get(actor.let_go.remote("cpu"))
    assert client.wait_job(job["id"], timeout=30)["state"] == "cancelled"
    assert not client.route(SD15)["loaded"]


def test_a_file_is_sent_to_the_node_that_lacks_it(fleet: Fleet, client: Client) -> None:
    key = client.model(UNET)["id"]
    assert list(client.model(UNET)["nodes"]) == ["node-a"]
    client.set_metadata(UNET, tags=["sent"], description="goes along")
    answer = client.load(UNET, "node-b/cpu")
    result = answer["result"]
    assert result["device"] == "node-b/cpu" and result["model_id"] == key
    sent = [e for e in fleet.events("model.transferred") if e["model_id"] == key]
    assert len(sent) == 1 and sent[0]["source"] == "node-a" and sent[0]["target"] == "node-b"
    # node-b hashed what it received: the same key (content hash), the same bytes
    nodes = client.model(key)["nodes"]
    assert set(nodes) == {"node-a", "node-b"}
    assert filecmp.cmp(nodes["node-a"]["path"], nodes["node-b"]["path"], shallow=False)
    assert node_metadata(fleet, "node-b", client.model(key))["tags"] == ["sent"]  # its metadata along
    assert sent[0]["bytes"] == Path(nodes["node-a"]["path"]).stat().st_size
    # the bytes landed in node-b's RAM cache too: the load that followed came from RAM
    assert sent[0]["to_disk"] and sent[0]["segments"] == 1
    assert set(result["sources"].values()) == {"ram"}
    # the driver's job showed the node's progress (bytes) before it ended
    job = answer["job"]["id"]
    mine = [e for e in list(fleet.orch.bus.recent) if e.get("job") == job]
    progress = [e["progress"] for e in mine if e["type"] == "job.progress"]
    assert [e["type"] for e in mine][-1] == "job.succeeded"
    assert any(p.get("unit") == "bytes" and p.get("done") == sent[0]["bytes"] for p in progress)


def test_a_file_received_into_ram_only(fleet: Fleet, client: Client) -> None:
    key = client.model(SD15)["id"]
    url = f"{fleet.svc.url}/api/model/cache"
    httpx.delete(url, params={"node": "node-a"}).raise_for_status()  # nothing of it cached there yet
    fleet.orch.cluster.receive_to_disk = False
    try:
        fleet.run(lambda: fleet.orch.loads.transfer(SD15, "node-a"))
    finally:
        fleet.orch.cluster.receive_to_disk = True
    where = client.model(key)["nodes"]["node-a"]["path"]
    assert where.startswith("/dev/shm/") and not (fleet.roots["node-a"] / "received").exists()
    cache = client.cache()["nodes"]["node-a"]
    mine = [s for s in cache["segments"] if key in s["models"]]
    assert len(mine) == 3 and all(s["component_id"].startswith("node-a/") for s in mine)
    # its segments are the received pages (hard links), and loading it there is a RAM hit
    assert all(Path(s["path"]).stat().st_nlink >= 2 for s in mine)
    loaded = client.load(SD15, "node-a/cpu")["result"]
    assert set(loaded["sources"].values()) == {"ram"}
    client.unload(SD15, device="node-a/cpu")
    # evicted from RAM, the RAM-only copy is gone from the node
    cleared = httpx.delete(url, params={"node": "node-a"}).json()
    assert cleared["dropped"] >= 3
    until(lambda: set(client.model(key)["nodes"]) == {"node-b"}, 10, "the RAM-only copy forgotten")
    assert not Path(where).exists()


def test_cache_per_node_through_rest(fleet: Fleet, client: Client) -> None:
    url = f"{fleet.svc.url}/api/model/cache"
    key = client.model(CLIP_L)["id"]
    filled = httpx.post(url, json={"model_id": CLIP_L, "node": "node-b"}, timeout=60).json()
    [seg] = filled["result"]["segments"]
    assert seg["node"] == "node-b" and seg["component_id"].startswith("node-b/") and key in seg["models"]
    view = client.cache()
    assert set(view["nodes"]) == {"node-a", "node-b"}
    assert seg["component_id"] in {s["component_id"] for s in view["nodes"]["node-b"]["segments"]}
    assert {n["name"]: n for n in client.status()["nodes"]}["node-b"]["cache"]["segments"] >= 1
    assert client.cache_segment(seg["component_id"])["bytes"] == seg["bytes"]
    dropped = client.cache_drop(seg["component_id"][: len("node-b/") + 10])  # a prefix, as on one host
    assert dropped == {"component_id": seg["component_id"], "freed_bytes": seg["bytes"]}
    with pytest.raises(ApiError) as gone:
        client.cache_segment(seg["component_id"])
    assert gone.value.status_code == 404
    with pytest.raises(ApiError) as unnamed:
        client.cache_drop("abc")
    assert unnamed.value.status_code == 422 and "node/component" in unnamed.value.message
    # a refresh rescans every node's roots: one job, the nodes' results summed
    rescanned = client.refresh(wait=True, hash=False)["result"]
    assert rescanned["summary"]["total"] >= 6 and rescanned["summary"]["added"] == 0


def test_operations_and_loras_on_the_node_holding_the_model(fleet: Fleet, client: Client) -> None:
    key, lora = client.model(SD15)["id"], client.model(LORA)["id"]
    with pytest.raises(ApiError) as cold:
        client.validate(SD15)
    assert cold.value.error_code == "NOT_LOADED"
    assert client.load(SD15)["result"]["device"] == "node-b/cpu"
    [v] = client.validate(SD15, level="weights")["result"]
    assert v["model_id"] == key and v["device"] == "node-b/cpu"
    assert set(v["components"]) == {"unet", "vae", "text_encoder"}
    assert all(c["passed"] for c in v["components"].values())
    [b] = client.benchmark(component="vae", steps=1, warmup=0)["result"]
    assert b["device"] == "node-b/cpu" and b["components"]["vae"]["figures"]
    [o] = client.optimize(SD15, component="unet", options={"channels_last": True}, measure=False)["result"]
    assert o["components"]["unet"]["applied"][0]["option"] == "channels_last"
    # the LoRA's file is on node-a only: sent to node-b, then applied there
    applied = client.apply_lora(SD15, LORA, strength=0.8)
    assert applied["lora_id"] == lora and applied["applied"][0]["device"] == "node-b/cpu"
    assert applied["applied"][0]["matched_keys"] > 0
    assert client.status("node-b/cpu")["models"][0]["loras"][lora]["strength"] == 0.8
    assert client.lora_strength(SD15, LORA, 0.3)["devices"][0]["device"] == "node-b/cpu"
    assert client.status("node-b/cpu")["models"][0]["loras"][lora]["strength"] == 0.3
    client.remove_lora(SD15, lora)
    assert client.status("node-b/cpu")["models"][0]["loras"] == {}
    with pytest.raises(ApiError) as not_lora:
        client.apply_lora(SD15, CLIP_L)
    assert not_lora.value.status_code == 422 and "not a LoRA" in not_lora.value.message


def test_reconcile_and_memory_on_the_nodes(fleet: Fleet, client: Client) -> None:
    key = client.model(SD15)["id"]
    assert client.load(SD15)["result"]["device"] == "node-b/cpu"
    # every device of the cluster (*), of one node, one device: in step with the workers
    every = client.reconcile("*")
    assert set(every["devices"]) == {"node-a/cpu", "node-b/cpu"}
    assert every["lost"] == every["adopted"] == every["unmanaged"] == []
    assert set(client.reconcile("node-b")["devices"]) == {"node-b/cpu"}
    assert client.reconcile("node-b/cpu")["devices"]["node-b/cpu"]["lost"] == []
    with pytest.raises(ApiError) as nowhere:
        client.reconcile("node-z")
    assert nowhere.value.status_code == 404
    # the memory route on the node: a model leased on the driver is kept, then freed once released
    lease = client.lease(SD15, device="node-b/cpu")
    kept = client.optimize_memory("node-b/cpu", target_free_mb=1000)
    assert kept["device"] == "node-b/cpu" and kept["lost"] == [] and kept["unloaded"] == []
    assert kept["kept"] and all(name.startswith(key + "/") for name in kept["kept"])
    client.release_lease(lease["id"])
    freed = client.optimize_memory("node-b/cpu", target_free_mb=1000)
    assert freed["kept"] == [] and set(freed["lost"]) <= {key}  # lost: unless its worker said so first
    assert sorted(freed["unloaded"]) == [f"{key}/{c}" for c in ("text_encoder", "unet", "vae")]
    assert client.status("node-b/cpu")["models"] == []  # the driver's view followed the node's
    with pytest.raises(ApiError) as bare:
        client.optimize_memory("cpu")
    assert bare.value.status_code == 404 and "node/device" in bare.value.message


def test_metadata_and_components_on_the_node_registries(fleet: Fleet, client: Client) -> None:
    from modelkeeper.testing.demo import write_demo_models

    # a transformer-only Flux on both nodes, its VAE on node-a only
    write_demo_models(fleet.roots["node-a"], only=["flux-transformer", "flux-vae"])
    write_demo_models(fleet.roots["node-b"], only=["flux-transformer"])
    client.refresh(wait=True)
    flux = client.model(FLUX)
    key = flux["id"]
    assert set(flux["nodes"]) == {"node-a", "node-b"}
    written = client.set_metadata(FLUX, description="tiny", tags=["cluster"])
    assert written["model_id"] == key and written["tags"] == ["cluster"]
    assert [node_metadata(fleet, n, flux)["description"] for n in ("node-a", "node-b")] == ["tiny"] * 2
    assert client.metadata(key)["description"] == "tiny" and client.model(key)["tags"] == ["cluster"]
    # pins are checked on each node as on one host: a part that does not fit is refused ...
    with pytest.raises(ApiError) as unfit:
        client.set_metadata(key, default_settings={"parts": {"vae": "tiny-clip-l"}})
    assert unfit.value.error_code == "INCOMPATIBLE_PART" and "on node-a" in unfit.value.message
    # ... and one that fits on node-a but is nowhere on node-b too, undone on node-a
    with pytest.raises(ApiError) as elsewhere:
        client.set_metadata(key, default_settings={"parts": {"vae": "tiny-flux-vae"}})
    assert elsewhere.value.error_code == "INCOMPATIBLE_PART" and "on node-b" in elsewhere.value.message
    assert node_metadata(fleet, "node-a", flux)["default_settings"] == {}
    # the components of every node's registry, one entry per component, models by cluster key
    clip = client.model(CLIP_L)["id"]
    entries = [c for c in client.components() if any(u["model_id"] == clip for u in c["models"])]
    assert len(entries) == 1 and set(entries[0]["nodes"]) == {"node-a", "node-b"}
    assert [u["model_id"] for u in entries[0]["models"]].count(clip) == 1
    vaes = client.components("vae")
    assert vaes and {c["kind"] for c in vaes} == {"vae"}
    assert any(u["model_id"] == client.model("tiny-flux-vae")["id"] for c in vaes for u in c["models"])


def test_an_install_goes_onto_one_node(fleet: Fleet, client: Client) -> None:
    done = client.install(f"tiny/lora:{PEFT}")
    result, node = done["result"], done["result"]["node"]
    assert done["job"]["kind"] == "install" and done["job"]["state"] == "succeeded"
    assert node in ("node-a", "node-b") and Path(result["path"]).is_relative_to(fleet.roots[node])
    model = client.model(result["model_id"])  # the cluster key: its hash
    assert model["id"] == result["model_id"] and set(model["nodes"]) == {node}
    assert model["type"] == "lora"


def test_rest_and_cli_against_the_cluster(fleet: Fleet, client: Client) -> None:
    runner = CliRunner()
    url = ["--url", fleet.svc.url]
    routed = runner.invoke(cli, ["route", CKPT, "--load", *url])
    assert routed.exit_code == 0, routed.output
    assert "node-a/cpu" in routed.output
    shown = runner.invoke(cli, ["status", *url])
    assert shown.exit_code == 0, shown.output
    assert "node-a/cpu" in shown.output and "node-b/cpu" in shown.output
    one = client.status("node-a/cpu")
    assert one["node"] == "node-a" and [m["name"] for m in one["models"]] == ["tiny-sd15"]
    assert client.ready()["ready"]
    assert "modelkeeper_cluster_nodes 2.0" in client.metrics()
    with pytest.raises(ApiError) as missing:
        client.load(CKPT, "node-z/cpu")
    assert missing.value.status_code == 404


def test_a_restarted_driver_attaches_to_the_running_agents(fleet: Fleet, client: Client) -> None:
    loaded = client.load(CLIP_L)["result"]
    before = {n["name"]: n["pid"] for n in client.status()["nodes"]}

    async def restarted() -> tuple[dict[str, Any], dict[str, Any]]:
        other = ClusterOrchestrator(Settings(), fleet.orch.cluster, agent_class=GatedAgent)
        await other.start()
        try:
            return other.views.status(), await other.route(CLIP_L)
        finally:
            await other.stop()

    status, route = asyncio.run(restarted())  # its own loop and state, as a new API process has
    assert {n["name"]: n["pid"] for n in status["nodes"]} == before  # the same agents, found by name
    assert route["device"] == loaded["device"]


def test_a_node_killed_mid_load_and_its_kept_model_placed_again(fleet: Fleet, client: Client) -> None:
    import ray

    fleet.lc.add("node-c")  # a node that joins is used at once
    until(lambda: "node-c" in fleet.orch.members.links, 120, "node-c attached")
    assert "node-c/cpu" in {d["id"] for d in client.status()["devices"]}
    actor = fleet.actor("node-c")
    ray.get(actor.gate.remote("cpu"))
    job = client.load(CLIP_L, "node-c/cpu", wait=False, keep_loaded=True)["job"]
    until(lambda: ray.get(actor.queued.remote("cpu")) >= 1, what="the load queued on node-c")
    pid = ray.get(actor.pid.remote())
    killed = time.time()
    fleet.lc.kill("node-c", [pid])
    failed = client.wait_job(job["id"], timeout=30)
    assert failed["state"] == "failed"
    assert failed["error"]["error_code"] == "WORKER_DIED" and "node-c" in failed["error"]["error"]
    lost = until(lambda: fleet.events("node.lost"), 10, "node.lost")
    assert lost[0]["node"] == "node-c" and lost[0]["at"] - killed < 2.0
    # the kept model is loaded again on a node still there; nothing else stopped
    placed = until(lambda: client.route(CLIP_L)["device"], 30, "the kept model placed again")
    assert placed in ("node-a/cpu", "node-b/cpu")
    assert {d["id"] for d in client.status()["devices"]} == {"node-a/cpu", "node-b/cpu"}
    assert client.load(SD15)["result"]["device"] == "node-b/cpu"
    fleet.run(lambda: fleet.orch.loads.unload(CLIP_L, force=True))
    assert CLIP_L not in {k for k, _ in fleet.orch.loads.kept.items()}
