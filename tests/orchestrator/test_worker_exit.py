"""A worker's death is told with what it wrote since its last answer (or only how it ended), never
with an old traceback of a request answered long before."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from modelkeeper.orchestrator.workers import WorkerSlot, exit_words
from modelkeeper.protocol.client import WorkerProcess

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="writes through /proc/PID/fd")


def _say(proc: WorkerProcess, text: str) -> None:
    """Write ``text`` on the worker's stderr (its pipe, opened through /proc) and wait until the
    service side has read it: the moment of each line is the test's, not a race."""
    with open(f"/proc/{proc.pid}/fd/2", "w") as stderr:
        stderr.write(text + "\n")
    tail = proc._stderr_tail
    assert tail is not None
    deadline = time.monotonic() + 30
    while text not in tail.text(wait=0):
        assert time.monotonic() < deadline, f"{text!r} never reached the stderr tail"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0, "exited with code 0"),
        (1, "exited with code 1"),
        (None, "exited with code None"),
        (-9, "was killed by signal 9 (SIGKILL)"),
        (-15, "was killed by signal 15 (SIGTERM)"),
        (-200, "was killed by signal 200"),
    ],
)
def test_exit_words(code: int | None, words: str) -> None:
    assert exit_words(code) == words


def test_a_killed_worker_is_not_blamed_on_a_traceback_it_answered_before() -> None:
    async def scenario() -> list[str | None]:
        exited = asyncio.Event()
        slot = WorkerSlot("cpu", "cpu", args=[], start_timeout=120, on_exit=lambda s, code: exited.set())
        await slot.start()
        proc = slot.proc
        assert isinstance(proc, WorkerProcess)
        errors: list[str | None] = []
        try:
            # an earlier request logged a traceback, then the worker answered: that is over
            _say(proc, "RuntimeError: Input type (float) and bias type (c10::Half) should be the same")
            await slot.status()
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(exited.wait(), 60)
            errors.append(slot.last_error)
            # what it writes after its last answer is the clue, and is kept
            exited.clear()
            await slot.restart()
            proc = slot.proc
            assert isinstance(proc, WorkerProcess)
            await slot.status()
            _say(proc, "Fatal Python error: Segmentation fault")
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(exited.wait(), 60)
            errors.append(slot.last_error)
        finally:
            await slot.stop()
        return errors

    first, second = asyncio.run(scenario())
    assert first is not None and first.endswith("was killed by signal 9 (SIGKILL)"), first
    assert "RuntimeError" not in first
    assert second is not None
    assert second.endswith("was killed by signal 9 (SIGKILL): Fatal Python error: Segmentation fault"), second
