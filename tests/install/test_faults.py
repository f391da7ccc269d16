"""Faults while transferring: dropped connections, resumes, corrupt bytes, a cancel, a server that sends
too much, a full disk, and two installs at once. Each is injected by the server at a byte offset."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from modelkeeper.install import (
    PARTIAL_DIR,
    ChecksumMismatch,
    DownloadFailed,
    InstallCancelled,
    Installer,
    InstallProgress,
    InstallResult,
    InsufficientDisk,
    SizeMismatch,
)
from modelkeeper.testing.hubserver import FakeHub
from tests.install.conftest import CHECKPOINT, MiB, files_under, make_installer


def checkpoint_size(hub: FakeHub) -> int:
    return hub.repos["tiny/checkpoint"].files[CHECKPOINT].size


def ranged(hub: FakeHub) -> list[str]:
    return [r.headers["range"] for r in hub.requests if "range" in r.headers and r.path.startswith("/cdn/")]


def test_flipped_byte_is_refused_and_deleted(hub: FakeHub, installer: Installer, root: Path) -> None:
    hub.fault(CHECKPOINT).flip_byte_at = 1234
    with pytest.raises(ChecksumMismatch) as failure:
        installer.install("tiny/checkpoint", root)
    expected = hub.repos["tiny/checkpoint"].files[CHECKPOINT].sha256
    assert f"tiny/checkpoint: SHA-256 mismatch: expected {expected}, got " in str(failure.value)
    assert failure.value.details["actual"] != expected
    assert files_under(root, partials=True) == []  # nothing left, not even a partial


def test_flipped_byte_in_a_small_git_file_is_refused(hub: FakeHub, installer: Installer, root: Path) -> None:
    hub.fault("unet/config.json").flip_byte_at = 3
    with pytest.raises(ChecksumMismatch, match=r"tiny/sd15: unet/config.json: git blob id mismatch"):
        installer.install("tiny/sd15", root)
    assert files_under(root, partials=True) == []


def test_dropped_connection_resumes_with_a_range(hub: FakeHub, installer: Installer, root: Path) -> None:
    size = checkpoint_size(hub)
    hub.fault(CHECKPOINT).drop_after = size // 2
    result = installer.install("tiny/checkpoint", root)
    assert result.files[0].sha256 == hub.repos["tiny/checkpoint"].files[CHECKPOINT].sha256
    assert ranged(hub) == [f"bytes={size // 2}-"]
    assert hub.served_bytes[CHECKPOINT] == size


def test_interrupted_install_resumes_transferring_only_the_rest(
    hub: FakeHub, tmp_path: Path, root: Path
) -> None:
    size = checkpoint_size(hub)
    hub.fault(CHECKPOINT).drop_after = size // 3
    with make_installer(hub, None, tmp_path, retries=0) as installer:
        with pytest.raises(
            DownloadFailed, match=f"tiny/checkpoint: connection failed 1 times at byte {size // 3}"
        ):
            installer.install("tiny/checkpoint", root)
        assert files_under(root) == []  # the partial waits in the staging folder only
        assert any(n.endswith(".part") for n in files_under(root, partials=True))
        mark = len(hub.requests)
        result = installer.install("tiny/checkpoint", root)
    second = sum(r.served for r in hub.requests[mark:])
    assert second <= size - size // 3 + MiB
    assert result.files[0].transferred_bytes == second
    assert result.path.read_bytes() == hub.repos["tiny/checkpoint"].files[CHECKPOINT].local.read_bytes()
    assert files_under(root, partials=True) == [f"checkpoints/{CHECKPOINT}"]


def _install_in_background(
    installer: Installer, root: Path, cancel: threading.Event
) -> tuple[threading.Thread, list[BaseException]]:
    """The checkpoint's install started on a thread; what it raises lands in the returned list."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            installer.install("tiny/checkpoint", root, cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_for_partial_bytes(root: Path, timeout_s: float = 30.0) -> None:
    """Until a partial file under ``root`` holds bytes (a condition, not a pause)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(
            (root / p).stat().st_size > 0 for p in files_under(root, partials=True) if p.endswith(".part")
        ):
            return
        time.sleep(0.01)
    raise AssertionError(f"no partial file with bytes under {root} after {timeout_s} s")


def test_cancel_during_a_slow_transfer_then_resume(hub: FakeHub, installer: Installer, root: Path) -> None:
    size = checkpoint_size(hub)
    fault = hub.fault(CHECKPOINT)
    fault.pause_at = size // 2
    cancel = threading.Event()
    thread, outcome = _install_in_background(installer, root, cancel)
    assert fault.paused.wait(30)
    _wait_for_partial_bytes(root)  # the client has written some of the first half
    cancel.set()
    thread.join(30)  # the cancel ends the transfer while the server still holds the second half
    fault.resume.set()
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], InstallCancelled)
    assert outcome[0].code == "CANCELLED" and outcome[0].recoverable
    assert files_under(root) == []
    (part,) = (root / p for p in files_under(root, partials=True) if p.endswith(".part"))
    kept = part.stat().st_size  # what the client had read when it saw the cancel
    assert 0 < kept <= size // 2
    mark = len(hub.requests)
    events: list[InstallProgress] = []
    result = installer.install("tiny/checkpoint", root, progress=events.append)
    assert events[-1].done_bytes == events[-1].total_bytes == size  # the resumed bytes count as done
    # counted per request: the first response's late bytes (sent after the cancel) are not this run's
    assert sum(r.served for r in hub.requests[mark:]) == result.transferred_bytes <= size - kept + MiB


@pytest.mark.parametrize("no_length", [False, True])
def test_more_bytes_than_declared_are_refused(
    hub: FakeHub, installer: Installer, root: Path, no_length: bool
) -> None:
    fault = hub.fault(CHECKPOINT)
    fault.extra_bytes, fault.no_length = 4096, no_length
    with pytest.raises(
        SizeMismatch, match=f"tiny/checkpoint: the server (announces|sent more than).* {checkpoint_size(hub)}"
    ):
        installer.install("tiny/checkpoint", root)
    assert files_under(root, partials=True) == []


def test_not_enough_disk_is_refused_before_any_transfer(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    with (
        make_installer(hub, None, tmp_path, free_bytes=lambda _path: 1000) as installer,
        pytest.raises(InsufficientDisk, match=f"tiny/checkpoint: needs {checkpoint_size(hub):,} bytes"),
    ):
        installer.install("tiny/checkpoint", root)
    assert hub.served_bytes[CHECKPOINT] == 0
    assert files_under(root, partials=True) == []


def test_content_already_present_is_not_downloaded(
    hub: FakeHub, tmp_path: Path, installer: Installer, root: Path
) -> None:
    first = installer.install("tiny/checkpoint", root)
    served = hub.served_bytes[CHECKPOINT]
    again = installer.install("tiny/checkpoint", root)  # same destination, same content
    assert again.files[0].reused and again.path == first.path
    # Elsewhere, found through the registry's lookup by SHA-256.
    known = {first.files[0].sha256: first.path}
    with make_installer(hub, None, tmp_path, known_files=known.get) as other:
        copy = other.install("tiny/checkpoint", tmp_path / "elsewhere")
    assert copy.files[0].reused and copy.path.read_bytes() == first.path.read_bytes()
    assert hub.served_bytes[CHECKPOINT] == served


def test_blob_in_the_hub_cache_is_used(
    hub: FakeHub, installer: Installer, tmp_path: Path, root: Path
) -> None:
    entry = hub.repos["tiny/checkpoint"].files[CHECKPOINT]
    assert entry.sha256 is not None
    blobs = tmp_path / "hf-cache" / "models--tiny--checkpoint" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copy(entry.local, blobs / entry.sha256)
    result = installer.install("tiny/checkpoint", root)
    assert result.files[0].reused and hub.served_bytes[CHECKPOINT] == 0


def test_two_identical_installs_at_once_are_coalesced(hub: FakeHub, installer: Installer, root: Path) -> None:
    size = checkpoint_size(hub)
    fault = hub.fault(CHECKPOINT)
    fault.pause_at = size // 2
    results: list[InstallResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(installer.install("tiny/checkpoint", root)))
        for _ in range(2)
    ]
    threads[0].start()
    assert fault.paused.wait(30)
    threads[1].start()
    while installer.in_flight() != {"tiny/checkpoint": 2}:  # until the second has joined
        threading.Event().wait(0.001)
    fault.resume.set()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2 and results[0] == results[1]
    assert hub.served_bytes[CHECKPOINT] == size
    assert (
        sum(
            1
            for r in hub.requests
            if r.path.endswith(f"/resolve/{hub.repos['tiny/checkpoint'].commit}/{CHECKPOINT}")
        )
        == 1
    )


def test_a_failed_install_leaves_no_staging_folder(hub: FakeHub, installer: Installer, root: Path) -> None:
    hub.fault(CHECKPOINT).flip_byte_at = 0
    with pytest.raises(ChecksumMismatch):
        installer.install("tiny/checkpoint", root)
    assert not (root / PARTIAL_DIR).exists()


def test_cancel_while_the_server_sends_nothing(hub: FakeHub, installer: Installer, root: Path) -> None:
    """A stalled server: the cancel cuts the connection instead of waiting for the next byte."""
    fault = hub.fault(CHECKPOINT)
    fault.pause_at = checkpoint_size(hub) // 4  # and never resumed during the test
    cancel = threading.Event()
    thread, outcome = _install_in_background(installer, root, cancel)
    assert fault.paused.wait(30)
    cancel.set()
    thread.join(30)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], InstallCancelled)
    assert files_under(root) == []


def test_server_errors_are_retried_then_reported(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    fault = hub.fault(CHECKPOINT)
    fault.error_status, fault.error_times = 503, 2
    with make_installer(hub, None, tmp_path, retries=2) as installer:
        assert installer.install("tiny/checkpoint", root).path.is_file()
    fault.error_status, fault.error_times = 500, 5
    with (
        make_installer(hub, None, tmp_path, retries=2) as installer,
        pytest.raises(
            DownloadFailed, match=r"tiny/checkpoint: connection failed 3 times at byte 0 .*server error 500"
        ),
    ):
        installer.install("tiny/checkpoint", root / "b")
    assert files_under(root / "b") == []


def test_discard_partials(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    hub.fault(CHECKPOINT).drop_after = checkpoint_size(hub) // 3
    with make_installer(hub, None, tmp_path, retries=0) as installer:
        with pytest.raises(DownloadFailed):
            installer.install("tiny/checkpoint", root)
        kept = sum((root / n).stat().st_size for n in files_under(root, partials=True))
        assert installer.discard_partials(root) == kept > 0
        assert files_under(root, partials=True) == [] and installer.discard_partials(root) == 0
