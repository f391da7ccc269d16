"""Shared fixtures: the tiny demo model set, the device worker tests run on, one torch thread; and
:func:`scanned_service`, the real service of the API and dashboard tests.

``pytest --worker-device cuda:0`` runs the worker tests on a GPU (the default is the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from modelkeeper.testing import DemoManifest
    from modelkeeper.testing.service import RunningService

MiB = 1 << 20


def pytest_configure(config: pytest.Config) -> None:
    """One compute thread per test process: thousands of tiny ops on a 2-core machine run several
    times faster single-threaded (and xdist already runs one process per core). Worker
    subprocesses inherit it through the environment."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--worker-device", default="cpu", help="device for worker tests: cpu (default) or cuda:N"
    )


@pytest.fixture(scope="session")
def worker_device(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--worker-device"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    """Every demo model, written once per test process."""
    from modelkeeper.testing import write_demo_models  # imports diffusers: only for tests that need it

    root: Path = tmp_path_factory.mktemp("demo-models")
    return write_demo_models(root)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: parallel kernels cost more than they save."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def scanned_service(folder: Path, **settings: Any) -> Iterator[RunningService]:
    """A real service (uvicorn on a free port, a CPU worker subprocess, its registry in ``folder``)
    whose first scan, and hashing, has finished; ``settings``: ``model_roots`` and any other."""
    from modelkeeper.client import Client
    from modelkeeper.orchestrator import Settings
    from modelkeeper.testing.service import running_service

    values: dict[str, Any] = {
        "devices": ["cpu"],
        "db": folder / "registry.sqlite3",
        "port": 0,
        "ram_cache_bytes": 256 * MiB,
        "status_poll_s": 0.5,
        "worker_start_timeout": 120,
        **settings,
    }
    with running_service(Settings(**values)) as svc:
        with Client(svc.url, token=settings.get("token")) as c:
            for job in c.jobs(kind="scan"):
                assert c.wait_job(job["id"], timeout=120)["state"] == "succeeded"
        yield svc
