"""The client side of the protocol survives callers that give up, and odd error payloads."""

from __future__ import annotations

import asyncio

import pytest

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker
from tests.worker.conftest import src


def test_a_timed_out_acall_leaves_the_connection_usable(demo: DemoManifest) -> None:
    size_mb = demo["clip-g"].size_bytes / (1 << 20)
    with InProcessWorker("cpu", throttle_mb_s=size_mb / 2) as w:  # the load takes about 2 s

        async def slow() -> None:
            await w.acall(CommandType.LOAD_ENCODER, {"name": "g", **src(demo, "clip-g")}, timeout=0.2)

        with pytest.raises(ProtocolError) as info:
            asyncio.run(slow())
        assert info.value.code is ErrorCode.TIMEOUT
        # the late answer arrives and is dropped; the connection keeps working
        assert w.call(CommandType.GET_STATUS)["device"]["kind"] == "cpu"
        info2 = w.call(CommandType.GET_MODEL_INFO, timeout=60)
        assert not w.closed.is_set()
        assert info2["model_count"] in (0, 1)


def test_error_details_named_like_exception_fields_do_not_break_delivery() -> None:
    with InProcessWorker("cpu") as w:
        w.server.write(  # an error whose data carries keys named like ProtocolError's own arguments
            __import__("modelkeeper.protocol.messages", fromlist=["ErrorResponse"]).ErrorResponse(
                error="x", error_code=ErrorCode.BUSY, request_id="ghost", data={"message": "m", "code": "c"}
            )
        )
        assert w.unmatched.get(timeout=10).data == {"message": "m", "code": "c"}
        assert w.call(CommandType.GET_STATUS)["state"] == "idle"


def test_a_worker_that_cannot_start_says_why() -> None:
    """A worker that cannot open its device answers with the reason, not a stderr dump (issue 13:
    ``WorkerProcess("cuda:0")`` without CUDA only said "closed its output"); cuda:99 exists nowhere."""
    from modelkeeper.protocol.client import WorkerProcess

    with pytest.raises(ProtocolError) as info:
        WorkerProcess("cuda:99", hello_timeout=60)
    assert info.value.code is ErrorCode.WORKER_DIED
    reason = info.value.details["reason"]
    assert reason.startswith("device 'cuda:99': ") and ("CUDA" in reason or "device(s) present" in reason)
    assert info.value.message == f"worker[cuda:99] did not start: {reason} (exit code 2)"
    assert info.value.details["exit_code"] == 2 and "stderr" not in info.value.message
