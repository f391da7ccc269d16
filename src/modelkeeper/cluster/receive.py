"""Files between nodes, on the node's side: serving a model's bytes, and receiving them.

Sending: ``read_chunk`` reads one chunk of a model file into a NumPy array; the Ray object store
holds it as an out-of-band buffer, so the receiving node gets it as a view of its own object
store's shared memory (no copy after Ray's own transfer).

Receiving (:class:`Receiver`): the chunks of every file are requested ``ahead`` at a time (several
in flight, across files), written in order straight from the object store's memory into a staging
file in shared memory (``/dev/shm``: RAM), each file's BLAKE3 updated as its chunks arrive; a
one-file model whose BLAKE3 is not its cluster key fails before anything is registered. Then the
files go where the setting says:

- ``to_disk``: copied to ``<first model root>/<receive_dir>/<key[:16]>/`` (via a ``.partial``
  folder), registered from there, and the staged bytes become the model's RAM-cache segments;
- RAM only: moved into the agent's RAM root (:class:`RamFolders`), a model root of the agent's
  orchestrator, registered from there; its segments are hard links to the same pages (no second
  copy). When the RAM cache evicts them, the model's files are deleted (:meth:`Receiver.prune`)
  and the node no longer has it; nor has it once they are deleted from outside.

The RAM root and the staging folder belong to one agent, not to a node name: two clusters on one
machine (two services, a benchmark beside a service, test runs side by side) may each have a
``node-a``, and an agent that emptied a folder named by the node alone deleted what the other's
``node-a`` had just received. Each agent's folders carry its pid and a per-process count
(``/dev/shm/modelkeeper-received-<node>-<pid>-<n>``); an agent removes its own when it stops, and
one that starts removes those whose process is gone (an agent killed before it could stop).

Either way the node's registry scans and hashes the model, its BLAKE3 must equal the cluster key,
and the next load of it on this node is a RAM-cache hit. A component whose segment cannot be the
received file as it is (a checkpoint's component, repacked under its own header) is filled from
the received file through the same ``fill`` a load uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from blake3 import blake3

from modelkeeper.cache import CacheFull
from modelkeeper.cache.segment import SHM_DIR
from modelkeeper.cluster.errors import TransferFailed
from modelkeeper.cluster.keys import cluster_key
from modelkeeper.formats.conventions import SAFETENSORS_SUFFIXES
from modelkeeper.orchestrator import Orchestrator
from modelkeeper.orchestrator.loading import ComponentLoad, cache_plan, fill
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry import ModelRecord

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


#: The start of every agent's RAM root (``ram_root``): a path under it is no user's file.
RECEIVED = str(SHM_DIR / "modelkeeper-received-")
STAGING = str(SHM_DIR / "modelkeeper-staging-")
#: An agent's folder: ``modelkeeper-{received,staging}-<node>-<pid>-<n>``.
_OWNED = re.compile(r"^modelkeeper-(?:received|staging)-.+-(\d+)-\d+$")
_AGENTS = itertools.count()  # agents of this process: two of one node name stay apart


def ram_root(node: str, owner: str) -> Path:
    """The model root in shared memory where the agent ``owner`` (``<pid>-<n>``) of ``node`` keeps
    the models it received into RAM only."""
    return Path(f"{RECEIVED}{_safe(node)}-{owner}")


def _safe(node: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", node)


@dataclass(frozen=True)
class RamFolders:
    """One agent's folders in shared memory (see the module docstring): ``root``, the model root
    of what it received into RAM only; ``staging``, the files of transfers under way."""

    root: Path
    staging: Path

    @classmethod
    def of(cls, node: str) -> RamFolders:
        """New folders for an agent of ``node`` in this process (made by ``open``)."""
        owner = f"{os.getpid()}-{next(_AGENTS)}"
        return cls(ram_root(node, owner), Path(f"{STAGING}{_safe(node)}-{owner}"))

    def open(self) -> None:
        """Make the (empty) RAM root, once the folders of agents whose process is gone are removed."""
        remove_orphans()
        for folder in (self.root, self.staging):
            shutil.rmtree(folder, ignore_errors=True)
        self.root.mkdir(parents=True)

    def close(self) -> None:
        """Remove both folders and what they hold (the agent stops: its RAM cache is gone too)."""
        for folder in (self.root, self.staging):
            shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(shm_dir: Path = SHM_DIR) -> None:
    """Remove the agents' folders whose process is gone (killed before it could stop); a folder of
    a live process (another cluster's agent on this machine) is left alone."""
    for entry in shm_dir.iterdir():
        match = _OWNED.match(entry.name)
        if match and entry.is_dir() and not psutil.pid_exists(int(match.group(1))):
            log.info("removing %s: the agent that owned it is gone", entry)
            shutil.rmtree(entry, ignore_errors=True)


def read_chunk(path: Path, offset: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """``size`` bytes of ``path`` at ``offset`` (fewer at its end) in a NumPy array: one copy,
    from the page cache into the array, which Ray then places in its object store."""
    with open(path, "rb", buffering=0) as f:
        length = max(0, min(size, os.fstat(f.fileno()).st_size - offset))
        out = np.empty(length, dtype=np.uint8)
        got = 0
        view = memoryview(out.data)
        while got < length:
            n = os.preadv(f.fileno(), [view[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return out[:got]


@dataclass(frozen=True)
class Chunk:
    file: int  # index into the file list
    offset: int
    size: int


class Staged:
    """The files of one model being received into shared memory, each with its running BLAKE3."""

    def __init__(self, folder: Path, files: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.files = files
        self.paths = [folder / f["rel"] for f in files]
        self.hashers = [blake3(max_threads=blake3.AUTO) for _ in files]
        self.fds: list[int] = []

    def open(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for path, f in zip(self.paths, self.files, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self.fds.append(fd)
            os.ftruncate(fd, int(f["size"]))

    def write(self, chunk: Chunk, data: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        """One chunk, in file order: written where it belongs and added to the file's hash."""
        if data.size != chunk.size:
            raise TransferFailed(
                f"{self.files[chunk.file]['rel']}: {data.size} bytes at {chunk.offset}, expected {chunk.size}"
            )
        view = memoryview(data.data)
        done = 0
        while done < chunk.size:
            done += os.pwrite(self.fds[chunk.file], view[done:], chunk.offset + done)
        self.hashers[chunk.file].update(view)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self.hashers]


def chunks_of(files: list[dict[str, Any]], chunk: int) -> list[Chunk]:
    out: list[Chunk] = []
    for i, f in enumerate(files):
        size = int(f["size"])
        out.extend(Chunk(i, o, min(chunk, size - o)) for o in range(0, size, chunk))
    return out


class Receiver:
    """Receives models for one node's orchestrator (see the module docstring)."""

    def __init__(self, orch: Orchestrator, node: str, receive_dir: str, folders: RamFolders) -> None:
        self.orch = orch
        self.node = node
        self.receive_dir = receive_dir
        self.folders = folders  # its RAM root is a model root of ``orch``
        self.in_ram: dict[Path, set[str]] = {}  # a RAM-only model's folder -> its segments

    async def receive(
        self,
        key: str,
        source: Any,
        source_model_id: str,
        files: list[dict[str, Any]],
        *,
        chunk: int,
        ahead: int,
        to_disk: bool,
        progress: Progress,
    ) -> dict[str, Any]:
        """Pull ``files`` of ``source_model_id`` from ``source`` (another node's agent), register
        the model here and check its hash; answers the local model id, bytes and timings."""
        started = time.perf_counter()
        staged = Staged(self.folders.staging / key[:16], files)
        try:
            await asyncio.to_thread(staged.open)
            total = await self._pull(key, source, source_model_id, staged, chunk, ahead, progress)
        finally:
            staged.close()
        moved = time.perf_counter() - started
        try:
            top_rel = files[0]["rel"].split("/")[0]
            if len(files) == 1 and "/" not in files[0]["rel"] and staged.digests()[0] != key:
                raise TransferFailed(
                    f"model {key} received on {self.node} hashes to {staged.digests()[0]}: dropped",
                    expected=key,
                    got=staged.digests()[0],
                )
            top = await asyncio.to_thread(self._place, key, staged, top_rel, to_disk)
            record = await self._register(key, top)
            try:
                loads = await self.orch.catalog.component_loads(record)
            except ProtocolError:  # nothing a worker loads (a LoRA): no segment to make
                loads = []
            segments = await asyncio.to_thread(self._into_cache, record, loads, top.parent, staged.folder)
        finally:
            await asyncio.to_thread(shutil.rmtree, staged.folder, True)
        if not to_disk:
            self.in_ram[top] = set(segments)
        return {
            "model_id": record.id,
            "path": str(top),
            "bytes": total,
            "seconds": round(moved, 6),
            "to_disk": to_disk,
            "segments": segments,
        }

    async def _pull(
        self, key: str, source: Any, model_id: str, staged: Staged, chunk: int, ahead: int, progress: Progress
    ) -> int:
        """Every chunk, ``ahead`` requested at once, written in order (the hash needs the order)."""
        todo = chunks_of(staged.files, chunk)
        total = sum(c.size for c in todo)

        def request(c: Chunk) -> Any:
            return source.read.remote(model_id, staged.files[c.file]["rel"], c.offset, c.size)

        pending = [(c, request(c)) for c in todo[:ahead]]
        nxt, done = len(pending), 0
        while pending:
            c, ref = pending.pop(0)
            try:
                data = await ref
            except Exception as exc:
                raise TransferFailed(
                    f"model {key}: reading {staged.files[c.file]['rel']} from its node failed: {exc}", key=key
                ) from None
            if nxt < len(todo):  # keep ``ahead`` in flight while this one is written
                pending.append((todo[nxt], request(todo[nxt])))
                nxt += 1
            await asyncio.to_thread(staged.write, c, data)
            del data  # the object store's buffer is released
            done += c.size
            progress(done, total)
        return total

    def _place(self, key: str, staged: Staged, top_rel: str, to_disk: bool) -> Path:
        """The received files where they are served from: on disk (copied) or in the RAM root."""
        if to_disk:
            root = self.orch.catalog.roots[0] / self.receive_dir / key[:16]
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(staged.folder, partial)
        else:
            root = self.folders.root / key[:16]
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for entry in staged.folder.iterdir():  # the staged pages, linked: no copy in RAM
                if entry.is_dir():
                    shutil.copytree(entry, partial / entry.name, copy_function=os.link)
                else:
                    os.link(entry, partial / entry.name)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(partial, root)
        return root / top_rel

    async def _register(self, key: str, top: Path) -> ModelRecord:
        catalog = self.orch.catalog
        await catalog.scan(wait=True, hash=True)
        try:
            record = await catalog.resolve(str(top))
        except ProtocolError as exc:
            raise TransferFailed(
                f"model {key} received on {self.node} at {top} but not registered: {exc.message}"
            ) from None
        got = cluster_key(record)
        if got != key:
            await asyncio.to_thread(shutil.rmtree, top.parent, True)
            await catalog.scan(wait=True, hash=False)
            raise TransferFailed(
                f"model {key} received on {self.node} hashes to {got}: deleted", expected=key, got=got
            )
        return record

    def _into_cache(
        self, record: ModelRecord, loads: list[ComponentLoad], placed: Path, staged: Path
    ) -> list[str]:
        """Each component's segment: the received file itself when the segment is the whole file
        (a hard link to the staged pages), else filled from the received file; what does not fit
        the RAM cache is left out (the load then reads the file)."""
        feed = self.orch.feed
        if not feed.is_open:
            return []
        placed = Path(os.path.realpath(placed))
        out: list[str] = []
        for load in loads:
            plan = cache_plan(load)
            if plan is None:
                continue
            whole = plan.names is None and plan.source.suffix.lower() in SAFETENSORS_SUFFIXES
            try:
                if whole:
                    rel = Path(os.path.realpath(plan.source)).relative_to(placed)
                    pages = staged / rel  # the staged copy: the same pages as the RAM root's
                    seg = feed.cache.adopt(
                        pages, source=plan.source, component_id=plan.component_id, model=record.id
                    )
                else:
                    seg = fill(feed.cache, record, plan)
            except (CacheFull, OSError, ProtocolError) as exc:
                log.info("received %s: %s not cached: %s", record.id, plan.source, exc)
                continue
            out.append(seg.component_id)
        return out

    def prune(self) -> bool:
        """Delete the RAM-only models none of whose segments is cached any more, and forget those
        whose files were deleted from outside (the node must not offer a model it cannot load);
        True when one was (the caller rescans the roots)."""
        cache = self.orch.feed.cache
        evicted = [top for top, cids in self.in_ram.items() if cids and not any(c in cache for c in cids)]
        vanished = [top for top in self.in_ram if top not in evicted and not top.exists()]
        for top in evicted:
            with contextlib.suppress(OSError):
                shutil.rmtree(top.parent)
        for top in evicted + vanished:
            del self.in_ram[top]
        return bool(evicted or vanished)
