"""Faults with real processes and real signals: a worker killed mid-load, a hung worker, files
changed or deleted after registration, 32 threads loading and unloading at once."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.client import ApiError, Client
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.service import RunningService
from tests.api.conftest import (
    CLIP_L,
    SD15,
    SD15_CKPT,
    SDXL,
    ServiceFactory,
    checked_client,
    model_id,
    wait_for_segments,
)


def wait_for(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def shm_files(svc: RunningService) -> set[str]:
    """The segment files of this service's cache (other services of this test process have their own)."""
    return set(glob.glob(f"/dev/shm/modelkeeper-{os.getpid()}-{svc.service.feed.cache.instance}-*"))


@pytest.fixture(scope="module")
def slow(make_service: ServiceFactory) -> Iterator[RunningService]:
    # a ping unanswered for 5 s: a hang (1 s was also a worker answering late on a busy machine)
    with make_service(worker_args=["--throttle-mb-s", "5"], hash_on_start=False, ping_timeout=5.0) as running:
        yield running


def test_worker_killed_mid_load_is_restarted_and_reconciled(slow: RunningService) -> None:
    with checked_client(slow) as c:
        keep = model_id(c, CLIP_L)
        c.load(CLIP_L, keep_loaded=True)
        before = c.status("cpu")
        job = c.load(SDXL, wait=False)["job"]
        wait_for(lambda: c.job(job["id"])["progress"].get("step"), 30, "the load to start")
        time.sleep(0.5)
        os.kill(before["pid"], signal.SIGKILL)
        failed = c.wait_job(job["id"], timeout=30)
        assert failed["state"] == "failed" and failed["error"]["error_code"] == "WORKER_DIED", failed

        def restarted() -> dict[str, Any] | None:
            st = c.status("cpu")
            ok = st["state"] == "ready" and st["pid"] != before["pid"]
            return st if ok and [m["model_id"] for m in st["models"]] == [keep] else None

        after = wait_for(restarted, 120, "the worker to restart and reload the kept model")
        assert (
            after["restarts"] == before["restarts"] + 1
        )  # the module's service: other tests may have restarted it
        assert model_id(c, SDXL) not in [m["model_id"] for m in after["models"]]
        assert c.reconcile("cpu") == {"lost": [], "adopted": [], "unmanaged": []}
        assert shm_files(slow) == {s["path"] for s in c.cache()["segments"]}  # nothing leaked
        assert c.load(SD15)["result"]["state"] == "loaded"
        c.unload_all(force=True)


def test_hung_worker_times_out_and_is_restarted(slow: RunningService) -> None:
    with checked_client(slow) as c:
        pid = c.status("cpu")["pid"]
        restarts = c.status("cpu")["restarts"]
        os.kill(pid, signal.SIGSTOP)  # hung until the service has replaced it, however long that takes
        try:
            with pytest.raises(ApiError) as err:
                c.load(SD15_CKPT, timeout=2.0)
            assert err.value.status_code in (503, 504), err.value
            st = wait_for(
                lambda: (s := c.status("cpu"))["pid"] != pid and s["state"] == "ready" and s, 120, "restart"
            )
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert st["restarts"] == restarts + 1
        assert c.load(SD15_CKPT)["result"]["state"] == "loaded"
        c.unload_all(force=True)


def test_changed_and_deleted_files_are_refused_clearly(
    make_service: ServiceFactory, demo: DemoManifest, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for rel in (CLIP_L, SD15_CKPT):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo.root / rel, root / rel)
    with make_service(root=root, hash_on_start=False) as svc, Client(svc.url) as c:
        with (root / CLIP_L).open("ab") as f:
            f.write(b"\0" * 16)
        with pytest.raises(ApiError) as changed:
            c.load(CLIP_L)
        assert changed.value.status_code == 422 and "changed since it was registered" in changed.value.message
        mid = model_id(c, SD15_CKPT)
        (root / SD15_CKPT).unlink()
        with pytest.raises(ApiError) as gone:
            c.load(mid)
        assert gone.value.status_code == 404 and gone.value.error_code == "FILE_NOT_FOUND"
        report = c.refresh(wait=True)["result"]
        assert report["missing"] == [str(root / SD15_CKPT)]
        assert [r["path"] for r in report["rejected"]] == [CLIP_L]  # trailing bytes: a broken header
        assert c.status("cpu")["models"] == []


@pytest.fixture(scope="module")
def busy(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(devices=["cpu", "cpu"], hash_on_start=False) as running:
        yield running


def test_32_threads_loading_and_unloading(busy: RunningService) -> None:
    models = [CLIP_L, SD15, SD15_CKPT]
    outcomes: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with Client(busy.url) as c:
                for _ in range(6):
                    ref = rng.choice(models)
                    try:
                        if rng.random() < 0.6:
                            c.load(ref, rng.choice([None, "cpu:0", "cpu:1"]))
                            key = "load ok"
                        else:
                            c.unload(ref)
                            key = "unload ok"
                    except ApiError as exc:
                        key = f"{exc.status_code} {exc.error_code}"
                    with lock:
                        outcomes[key] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    print(f"\n32 threads x 6 operations: {dict(outcomes)}")
    documented = {"load ok", "unload ok", "409 NOT_LOADED", "409 BUSY"}
    assert set(outcomes) <= documented, outcomes
    assert outcomes["load ok"] > 0 and outcomes["unload ok"] > 0
    with Client(busy.url) as c:
        for device in ("cpu:0", "cpu:1"):
            st = c.status(device)
            assert all(m["state"] == "loaded" for m in st["models"]), st
            assert c.reconcile(device) == {"lost": [], "adopted": [], "unmanaged": []}
            assert st["memory"]["models_bytes"] == sum(m["bytes"] for m in st["models"])
        c.unload_all(force=True)
        assert all(d["models"] == [] for d in c.status()["devices"])
        assert shm_files(busy) == {s["path"] for s in c.cache()["segments"]}


def test_a_fill_that_cannot_fit_leaves_loads_on_disk(make_service: ServiceFactory) -> None:
    """The segment filling beside a load does not fit the RAM budget: the load is not hurt, the
    failure is published, and later loads read from disk again."""
    with make_service(ram_cache_bytes=1 << 16) as svc, Client(svc.url) as c:
        mid = model_id(c, SD15)
        first = c.load(SD15)["result"]
        assert set(first["sources"].values()) == {"disk"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failed = [e for e in list(svc.service.bus.recent) if e["type"] == "cache.fill_failed"]
            if len(failed) == 3:
                break
            time.sleep(0.05)
        assert len(failed) == 3 and all(e["model_id"] == mid for e in failed)
        assert "budget" in str(failed[0]["error"]) or "room" in str(failed[0]["error"])
        assert c.cache()["segments"] == []
        c.unload(mid)
        assert set(c.load(SD15)["result"]["sources"].values()) == {"disk"}


def test_every_component_of_an_unhashed_checkpoint_fills_alongside(make_service: ServiceFactory) -> None:
    """Without content ids (no hashing yet) a checkpoint's components share one path: each still
    gets its own segment filled beside the load."""
    with make_service(hash_on_start=False) as svc, Client(svc.url) as c:
        cache = svc.service.feed.cache
        fill = cache.cache_file

        def slow_fill(*args: Any, **kwargs: Any) -> Any:
            time.sleep(1.0)  # the fills of all three components overlap, as a big checkpoint's do
            return fill(*args, **kwargs)

        cache.cache_file = slow_fill  # type: ignore[method-assign]
        mid = model_id(c, SD15_CKPT)
        assert set(c.load(SD15_CKPT)["result"]["sources"].values()) == {"disk"}
        assert len(wait_for_segments(c, mid, 3)) == 3
