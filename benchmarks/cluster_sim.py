"""Model switching on a fleet too big to rent: a trace replayed through modelkeeper's placement
(``choose_placement`` over a ``ClusterView``, the code cluster mode runs) and through Ray Serve's
model multiplexing, on the same cluster, memory and trace.

Usage: python benchmarks/cluster_sim.py [--nodes 100 1000] [--duration 300] [--jobs 2] [--quick] [--out FILE]

The fleet: ``--nodes`` nodes of 8 GPUs (80 GB each), each node with a RAM cache of ``--ram-gb``
(1 TB) and a random ``--disk-share`` (25%) of the model files on its disk (every file on at least
one node). The catalog: 2,000 models with real sizes (:data:`KINDS`): SD1.5 2.1 GB (UNet 1.7 GB
fp16, VAE, text encoder), SDXL 6.9 GB, Flux with the transformer in bf16 (23.8 GB) or fp8 (11.9 GB)
plus T5 (9.5 GB), CLIP and VAE, and LoRAs of 20 to 400 MB (a LoRA is placed as a model of its own
size; the base it patches is not modelled).

Arrivals: requests arrive as a Poisson process at the rate that keeps ``--util`` (60%) of the GPUs
busy on average; each asks for one model drawn from a Zipf law (exponent ``--zipf``, 1.0) over the
catalog in a random order of popularity. A request holds its GPU for the load, if any, then for one
generation of its kind's inference time (SD1.5 1.5 s, SDXL 4 s, Flux 10-12 s); the model is in use
(leased) meanwhile. A GPU runs one request at a time. The first ``--warmup`` share of the trace
(20%) fills the caches and is not counted.

Loads take ``bytes / bandwidth`` of the fastest source (measured on H100/H200, docs/CLUSTER.md):
VRAM 0; modelkeeper's RAM cache 55 GB/s; the page cache 25 GB/s; the node's disk 2 GB/s; another
node over the network 12.5 GB/s, or its disk's 2 GB/s when only a disk has it. A load puts the file
in the node's RAM cache (modelkeeper) or page cache (Ray Serve), an LRU by bytes of the same size.

Policies:

- ``modelkeeper``: each request goes where ``choose_placement`` says: an idle device holding the
  model; else the least estimated time to ready between waiting for a busy holder and loading on
  an idle device of a node caching the model, having its file, or any node (from a peer). Eviction
  by ``plan_eviction`` with the view's value (recency plus the price of bringing a model back).
  Also run with the RAM cache at page-cache speed (25 GB/s), to separate policy from tier.
- ``ray-serve K=n``: one replica per GPU, ``@serve.multiplexed(max_num_models_per_replica=n)``,
  ``max_ongoing_requests=1``. Routing as Ray Serve's ``PowerOfTwoChoicesRequestRouter`` with its
  ``MultiplexMixin`` (read in ``ray/serve/_private/request_router/``): while the model-id matching
  timeout (uniform 1-2 s) runs, the first try samples two replicas reporting the model, later tries
  (and a first try for a model no replica has) two of the replicas with the fewest models; after it, those with the fewest models once,
  then any two. Of the two, an idle one is taken; none idle: retry after 0, 25, 50 ... 500 ms. A
  replica evicts its least recently used model when it holds ``n`` and loads the new one. ``n = 2``
  is the most that never overflows 80 GB with Flux bf16 (33.7 GB); a larger ``n`` can: such a load
  is counted as an OOM and, generously, the replica evicts further LRU models instead of failing.
  Also generous to it: replicas report their models at once, queue lengths are known without
  probes, and it loads from the same fastest source as modelkeeper (at page-cache speed).

Reported per policy, over the counted requests: cold loads (loads into VRAM), GB moved into VRAM
and over the network, seconds spent loading, time to ready (arrival to the model ready on its GPU:
queueing plus load) p50/p99, and the decision time p50/p99 (modelkeeper: one ``choose_placement``
call; Ray Serve: one routing try of this script's implementation, for scale only) as the CPU time
of the call (the thread's clock). The summary gives the placement decision's wall clock too: on a
shared machine its p99 is other processes' time slices, not the call's work. Targets: at
least 2x fewer seconds spent loading than the count-based policy at the same memory; a placement
decision within 1 ms p99 at 1,000 nodes.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import multiprocessing
import platform
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from modelkeeper.orchestrator.placement import DeviceView, Resident, plan_eviction
from modelkeeper.orchestrator.placement_tiers import choose_placement
from modelkeeper.orchestrator.tiers import Bandwidths, ClusterView, Tier

GB = 10**9
GPUS_PER_NODE = 8
VRAM = 80 * GB
PAGE_CACHE = 25e9

# kind: (share of the catalog, bytes (None: a LoRA, log-uniform 20-400 MB), inference seconds)
KINDS: dict[str, tuple[float, int | None, float]] = {
    "sd15": (0.40, int((1.72 + 0.167 + 0.246) * GB), 1.5),
    "sdxl": (0.30, int((5.14 + 0.246 + 1.39 + 0.167) * GB), 4.0),
    "flux-bf16": (0.04, int((23.8 + 9.52 + 0.246 + 0.168) * GB), 12.0),
    "flux-fp8": (0.06, int((11.9 + 9.52 + 0.246 + 0.168) * GB), 10.0),
    "lora": (0.20, None, 4.0),
}


@dataclass(frozen=True)
class Model:
    id: str
    kind: str
    bytes: int
    infer_s: float


@dataclass(frozen=True)
class Setup:
    """Everything both policies share: fleet, catalog, disks and trace."""

    nodes: int
    catalog: list[Model]
    disks: list[set[str]]  # per node, the model files on its disk
    trace: list[tuple[float, Model]]  # (arrival, model), in time order
    warmup_until: float
    ram_bytes: int


def make_setup(nodes: int, models: int, duration: float, util: float, zipf: float, disk_share: float,
               ram_gb: float, warmup: float, seed: int) -> Setup:  # fmt: skip
    rng = random.Random(seed)
    kinds = list(KINDS)
    catalog = []
    for i in range(models):
        kind = rng.choices(kinds, weights=[KINDS[k][0] for k in kinds])[0]
        size = KINDS[kind][1] or int(math.exp(rng.uniform(math.log(20e6), math.log(400e6))))
        catalog.append(Model(f"{kind}-{i:04d}", kind, size, KINDS[kind][2]))
    popularity = catalog[:]
    rng.shuffle(popularity)
    weights = list(itertools.accumulate(1 / (k + 1) ** zipf for k in range(models)))
    mean_infer = sum(w * m.infer_s for w, m in zip(_diffs(weights), popularity, strict=True)) / weights[-1]
    rate = util * nodes * GPUS_PER_NODE / mean_infer
    trace, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        trace.append((t, rng.choices(popularity, cum_weights=weights)[0]))
    disks: list[set[str]] = [set() for _ in range(nodes)]
    for m in catalog:
        for n in rng.sample(range(nodes), max(1, round(disk_share * nodes))):
            disks[n].add(m.id)
    return Setup(nodes, catalog, disks, trace, warmup * duration, int(ram_gb * GB))


def _diffs(cumulative: list[float]) -> Iterable[float]:
    return (b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False))


@dataclass
class Device:
    id: str
    node: int
    models: OrderedDict[str, float] = field(default_factory=OrderedDict)  # model -> last use, LRU first
    used: int = 0
    running: str | None = None
    queue: deque[tuple[float, Model]] = field(default_factory=deque)
    busy_until: float = 0.0


@dataclass
class Stats:
    """What the counted requests cost."""

    requests: int = 0
    loads: int = 0
    load_bytes: int = 0
    network_bytes: int = 0
    load_s: float = 0.0
    ooms: int = 0
    ready_s: list[float] = field(default_factory=list)
    decision_ns: list[int] = field(default_factory=list)  # wall clock
    decision_cpu_ns: list[int] = field(default_factory=list)  # this thread's CPU time
    tiers: dict[str, int] = field(default_factory=dict)


class Fleet:
    """The shared machinery: GPUs running one request at a time, node memories, loads, the clock.
    Subclasses decide where a request goes and what a GPU evicts."""

    memory_bandwidth = 55e9

    def __init__(self, setup: Setup, sizes: dict[str, int]):
        self.setup, self.sizes = setup, sizes
        self.bw = Bandwidths(ram=self.memory_bandwidth)
        self.where = ClusterView(self.bw)  # where the bytes are: node memories and disks (physics)
        self.memory: list[OrderedDict[str, int]] = [OrderedDict() for _ in range(setup.nodes)]
        self.mem_used = [0] * setup.nodes
        for n, files in enumerate(setup.disks):
            for m in files:
                self.where.set_disk(str(n), m, True)
        self.devices = [Device(f"{n}/cuda:{g}", n) for n in range(setup.nodes) for g in range(GPUS_PER_NODE)]
        self.stats = Stats()
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = itertools.count()
        self.now = 0.0

    # the event loop

    def run(self) -> Stats:
        for arrival, model in self.setup.trace:
            self.at(arrival, 0, model)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == 0:
                assert isinstance(payload, Model)
                self.arrive(payload, self.now)
            elif kind == 1:
                assert isinstance(payload, Device)
                self.finish(payload)
            else:
                self.retry(payload)
        return self.stats

    def at(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def counted(self, arrival: float) -> bool:
        return arrival >= self.setup.warmup_until

    def arrive(self, model: Model, arrival: float) -> None:
        raise NotImplementedError

    def retry(self, payload: object) -> None:
        raise NotImplementedError

    def evict_for(self, device: Device, model: Model) -> list[str]:
        raise NotImplementedError

    def changed(self, device: Device) -> None:
        """A device's models or work changed (modelkeeper mirrors it into its view)."""

    # running requests

    def start(self, device: Device, arrival: float, model: Model) -> None:
        """Run a request on an idle device: load the model if it is not there, then infer."""
        counted = self.counted(arrival)
        load = 0.0
        if model.id not in device.models:
            for victim in self.evict_for(device, model):
                device.used -= self.sizes[victim]
                del device.models[victim]
            tier = self.where.tier_at(str(device.node), model.id)
            load = self.bw.seconds(tier, model.bytes)
            device.models[model.id] = self.now
            device.used += model.bytes
            self.remember(device.node, model)
            if counted:
                s = self.stats
                s.loads += 1
                s.load_bytes += model.bytes
                s.load_s += load
                s.network_bytes += model.bytes if tier in (Tier.PEER_RAM, Tier.PEER_DISK) else 0
                s.tiers[tier.value] = s.tiers.get(tier.value, 0) + 1
        device.models.move_to_end(model.id)
        device.running = model.id
        end = self.now + load + model.infer_s
        device.busy_until = max(device.busy_until, end)
        if counted:
            self.stats.requests += 1
            self.stats.ready_s.append(self.now + load - arrival)
        self.changed(device)
        self.at(end, 1, device)

    def finish(self, device: Device) -> None:
        assert device.running is not None
        device.models[device.running] = self.now
        device.running = None
        if device.queue:
            arrival, model = device.queue.popleft()
            self.start(device, arrival, model)
        else:
            device.busy_until = 0.0
            self.changed(device)

    def remember(self, node: int, model: Model) -> None:
        """The node's RAM (or page) cache takes the file, dropping its least recently used."""
        memory = self.memory[node]
        if model.id in memory:
            memory.move_to_end(model.id)
            return
        memory[model.id] = model.bytes
        self.mem_used[node] += model.bytes
        self.where.set_ram(str(node), model.id, True)
        while self.mem_used[node] > self.setup.ram_bytes:
            old, size = memory.popitem(last=False)
            self.mem_used[node] -= size
            self.where.set_ram(str(node), old, False)


class Modelkeeper(Fleet):
    """Requests placed by ``choose_placement`` over a view kept in step with the fleet."""

    def __init__(self, setup: Setup, sizes: dict[str, int], memory_bandwidth: float = 55e9):
        self.memory_bandwidth = memory_bandwidth
        super().__init__(setup, sizes)
        self.view = self.where  # the same index: devices are added to it
        for d in self.devices:
            self.changed(d)
        self.by_id = {d.id: d for d in self.devices}

    def changed(self, device: Device) -> None:
        residents = tuple(
            Resident(m, self.sizes[m], used, leased=m == device.running) for m, used in device.models.items()
        )
        self.view.put_device(
            DeviceView(
                device.id, VRAM, device.used, residents, node=str(device.node), busy_until=device.busy_until
            )
        )

    def arrive(self, model: Model, arrival: float) -> None:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        p = choose_placement(self.view, model.id, model.bytes, now=self.now)
        if self.counted(arrival):
            self.stats.decision_ns.append(time.perf_counter_ns() - t0)
            self.stats.decision_cpu_ns.append(time.thread_time_ns() - c0)
        device = self.by_id[p.device]
        if device.running is None:
            self.start(device, arrival, model)
            return
        load = self.bw.seconds(p.tier, model.bytes)  # 0 for a holder
        device.busy_until = max(device.busy_until, self.now) + load + model.infer_s
        device.queue.append((arrival, model))
        self.changed(device)

    def evict_for(self, device: Device, model: Model) -> list[str]:
        return plan_eviction(
            self.view.device(device.id),
            model.id,
            model.bytes,
            value=self.view.eviction_value(str(device.node)),
        )


@dataclass
class Pending:
    """A request Ray Serve's router has not placed yet, with its routing context."""

    arrival: float
    model: Model
    timeout: float
    tries: int = 0
    tried_first: bool = False
    tried_fewest: bool = False


class Sampler:
    """A set that draws a random member in O(1), for the router's candidate sets."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def add(self, x: int) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def remove(self, x: int) -> None:
        i = self.pos.pop(x)
        last = self.items.pop()
        if last != x:
            self.items[i] = last
            self.pos[last] = i


class RayServe(Fleet):
    """Ray Serve's multiplexing: a per-replica LRU capped by count, model-id affinity, two choices."""

    memory_bandwidth = PAGE_CACHE
    BACKOFF = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.5)

    def __init__(self, setup: Setup, sizes: dict[str, int], cap: int, seed: int):
        super().__init__(setup, sizes)
        self.cap, self.rng = cap, random.Random(seed)
        self.holders: dict[str, Sampler] = {}
        self.by_count: dict[int, Sampler] = {0: Sampler()}
        for i in range(len(self.devices)):
            self.by_count[0].add(i)
        self.index = {d.id: i for i, d in enumerate(self.devices)}
        self.reported: dict[int, set[str]] = {}
        self.fallback: set[str] = set()
        self.all = Sampler()
        for i in range(len(self.devices)):
            self.all.add(i)

    def arrive(self, model: Model, arrival: float) -> None:
        self.route(Pending(arrival, model, self.rng.uniform(1.0, 2.0)))

    def retry(self, payload: object) -> None:
        assert isinstance(payload, Pending)
        self.route(payload)

    def candidates(self, p: Pending) -> Sampler | None:
        """``MultiplexMixin.apply_multiplex_routing``."""
        m = p.model.id
        if self.now - p.arrival < p.timeout:
            found = self.holders.get(m)
            if (not found and m not in self.fallback) or p.tried_first:
                found = self.fewest()
                self.fallback.add(m)
            elif found:
                self.fallback.discard(m)
            p.tried_first = True
            return found
        if not p.tried_fewest:
            p.tried_fewest = True
            return self.fewest()
        return self.all

    def fewest(self) -> Sampler:
        return self.by_count[min(c for c, s in self.by_count.items() if s.items)]

    def route(self, p: Pending) -> None:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        chosen = self.try_once(p)
        if self.counted(p.arrival):
            self.stats.decision_ns.append(time.perf_counter_ns() - t0)
            self.stats.decision_cpu_ns.append(time.thread_time_ns() - c0)
        if chosen is not None:
            self.start(self.devices[chosen], p.arrival, p.model)
            return
        self.at(self.now + self.BACKOFF[min(p.tries, len(self.BACKOFF) - 1)], 2, p)
        p.tries += 1

    def try_once(self, p: Pending) -> int | None:
        """``PowerOfTwoChoicesRequestRouter.choose_replicas``, then the first replica that accepts
        (``max_ongoing_requests=1``: an idle one)."""
        found = self.candidates(p)
        if not found or not found.items:
            return None
        items, n = found.items, len(found.items)
        if n == 1:
            pair = [items[0]]
        else:
            i = self.rng.randrange(n)
            j = self.rng.randrange(n - 1)
            pair = [items[i], items[j + (j >= i)]]
        for r in pair:
            if self.devices[r].running is None:
                return r
        return None

    def evict_for(self, device: Device, model: Model) -> list[str]:
        """``_ModelMultiplexWrapper.load_model``: at ``cap`` models, unload the least recently used."""
        order = list(device.models)
        victims = order[: max(0, len(order) - self.cap + 1)]
        used = device.used - sum(self.sizes[v] for v in victims)
        rest = order[len(victims) :]
        if used + model.bytes > VRAM and self.counted(self.now):
            self.stats.ooms += 1
        while used + model.bytes > VRAM:
            victim = rest.pop(0)
            victims.append(victim)
            used -= self.sizes[victim]
        return victims

    def changed(self, device: Device) -> None:
        """The replica reports its model ids (at once: generous) and its count of models."""
        i = self.index[device.id]
        before, now = self.reported.get(i, set()), set(device.models)
        if len(before) != len(now):
            self.by_count[len(before)].remove(i)
            self.by_count.setdefault(len(now), Sampler()).add(i)
        for m in device.models:  # in the device's order, not a set's: the run stays reproducible
            if m not in before:
                self.holders.setdefault(m, Sampler()).add(i)
        for m in sorted(before - now):
            self.holders[m].remove(i)
        self.reported[i] = now


# --- running and reporting ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


HEADER = (
    f"{'policy':<28}{'requests':>9}{'loads':>8}{'GB in':>9}{'GB net':>8}{'load s':>9}"
    f"{'ready p50':>10}{'p99':>8}{'decide p50':>11}{'p99':>9}{'OOM':>6}  loads by tier (decide: CPU time)"
)


def row(name: str, s: Stats) -> str:
    tiers = " ".join(f"{k}={v}" for k, v in sorted(s.tiers.items()))
    return (
        f"{name:<28}{s.requests:>9}{s.loads:>8}{s.load_bytes / GB:>9.0f}{s.network_bytes / GB:>8.0f}"
        f"{s.load_s:>9.0f}{percentile(s.ready_s, 0.5):>9.3f}s{percentile(s.ready_s, 0.99):>7.2f}s"
        f"{percentile([n / 1e3 for n in s.decision_cpu_ns], 0.5):>9.0f}us"
        f"{percentile([n / 1e3 for n in s.decision_cpu_ns], 0.99):>7.0f}us{s.ooms:>6}  {tiers}"
    )


_SETUP: Setup | None = None  # the setup of the cluster size being run, shared with forked workers


def run_policy(name: str, cap: int, seed: int) -> tuple[Stats, float]:
    """Replay the trace of ``_SETUP`` through one policy: its stats, and the seconds it took."""
    assert _SETUP is not None
    sizes = {m.id: m.bytes for m in _SETUP.catalog}
    t0 = time.perf_counter()
    if name == "modelkeeper":
        fleet: Fleet = Modelkeeper(_SETUP, sizes)
    elif name.startswith("modelkeeper"):
        fleet = Modelkeeper(_SETUP, sizes, PAGE_CACHE)
    else:
        fleet = RayServe(_SETUP, sizes, cap, seed)
    stats = fleet.run()
    return stats, time.perf_counter() - t0


def simulate(args: argparse.Namespace, nodes: int, out: Callable[[str], None]) -> dict[str, Stats]:
    setup = make_setup(nodes, args.models, args.duration, args.util, args.zipf, args.disk_share,
                       args.ram_gb, args.warmup, args.seed)  # fmt: skip
    sizes = {m.id: m.bytes for m in setup.catalog}
    counted = sum(1 for t, _ in setup.trace if t >= setup.warmup_until)
    out(
        f"\n{nodes} nodes x {GPUS_PER_NODE} GPUs ({VRAM // GB} GB), RAM cache {args.ram_gb:.0f} GB per node, "
        f"{args.disk_share:.0%} of the files on each disk; {len(setup.catalog)} models "
        f"({sum(sizes.values()) / 1e12:.1f} TB), Zipf {args.zipf}; {len(setup.trace)} requests over "
        f"{args.duration:.0f} s at {args.util:.0%} utilisation, the last {counted} counted"
    )
    out(HEADER)
    global _SETUP
    _SETUP = setup
    specs = [
        ("modelkeeper", 0),
        ("modelkeeper, RAM at 25 GB/s", 0),
        *((f"ray-serve K={k}", k) for k in args.caps),
    ]
    if args.jobs > 1:  # each policy in its own process, forked with the setup
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(specs))) as pool:
            done = pool.starmap(run_policy, [(name, k, args.seed) for name, k in specs])
    else:
        done = [run_policy(name, k, args.seed) for name, k in specs]
    results: dict[str, Stats] = {}
    for (name, _), (stats, seconds) in zip(specs, done, strict=True):
        results[name] = stats
        out(row(name, stats) + f"  [{seconds:.0f} s to simulate]")
    mk = results["modelkeeper"]
    best = min((k for k in results if k.startswith("ray-serve")), key=lambda k: results[k].load_s)
    safe = f"ray-serve K={min(args.caps)}"
    ratio_safe, ratio_best = (results[k].load_s / max(mk.load_s, 1e-9) for k in (safe, best))
    wall = [n / 1e3 for n in mk.decision_ns]

    def judge(target: str, met: bool) -> str:
        if args.quick:
            return " [a smoke run: targets not judged]"
        return f" [target {target}: {'met' if met else 'NOT met'}]"

    cpu = [n / 1e3 for n in mk.decision_cpu_ns]
    out(
        f"seconds loading, Ray Serve / modelkeeper: {ratio_safe:.1f}x at {safe} (never over VRAM), "
        f"{ratio_best:.1f}x at its best ({best}){judge('>= 2x', ratio_best >= 2)}"
    )
    out(
        f"placement decision (choose_placement) at {nodes} nodes: CPU time p50 {percentile(cpu, 0.5):.0f} us, "
        f"p99 {percentile(cpu, 0.99):.0f} us, max {max(cpu, default=math.nan):.0f} us; wall clock p50 "
        f"{percentile(wall, 0.5):.0f} us, p99 {percentile(wall, 0.99):.0f} us"
        f"{judge('p99 <= 1 ms, CPU time', percentile(cpu, 0.99) <= 1000)}"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--models", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of trace per cluster size")
    ap.add_argument("--util", type=float, default=0.6)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--disk-share", type=float, default=0.25)
    ap.add_argument("--ram-gb", type=float, default=1000.0)
    ap.add_argument("--warmup", type=float, default=0.2)
    ap.add_argument(
        "--caps", type=int, nargs="+", default=[2, 4, 8, 16], help="Ray Serve max_num_models_per_replica"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="policies simulated in parallel processes")
    ap.add_argument("--quick", action="store_true", help="4 nodes, 200 models, 60 s: a smoke run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.models, args.duration, args.ram_gb = [4], 200, 60.0, 200.0
    lines: list[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    out(
        f"cluster_sim {date.today()} on {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}; "
        f"seed {args.seed}"
    )
    for nodes in args.nodes:
        simulate(args, nodes, out)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
