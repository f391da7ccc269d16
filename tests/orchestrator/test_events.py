"""The event bus: its subscriptions (made when ``subscribe()`` returns, ended when closed or
cancelled), and its frames for the event streams (encoded once for every stream, filtered per
stream, ``job.progress`` thinned per job on the service-wide streams without losing a job's last
progress or its end)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import Any

from modelkeeper.orchestrator.events import EventBus, Frame, FrameSubscription, encode_frame


def on_loop(
    test: Callable[[EventBus], Awaitable[None]], progress_interval: float = 3600.0, coalesce: float = 0.0
) -> None:
    """Run ``test`` with a bus bound to a running loop; a long interval holds every progress
    after a job's first until its next event, so no timer decides what a test sees; streams are
    woken at the loop's next turn (``coalesce`` 0) unless a test asks for a window."""

    async def run() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        bus.frames.progress_interval = progress_interval
        bus.frames.coalesce = coalesce
        await test(bus)

    asyncio.run(run())


def drain(sub: FrameSubscription) -> list[Frame]:
    out = list(sub.frames)
    sub.frames.clear()
    return out


def parsed(frame: Frame) -> tuple[str, dict[str, Any]]:
    lines = frame.data.decode().split("\n")
    assert lines[-2:] == ["", ""] and lines[0].startswith("event: ") and lines[1].startswith("data: ")
    return lines[0][7:], json.loads(lines[1][6:])


def test_one_encoding_shared_by_every_stream_and_filters_per_stream() -> None:
    async def test(bus: EventBus) -> None:
        everything = bus.frames.subscribe()
        models = bus.frames.subscribe(types=("model.", "lease."))
        quiet = bus.frames.subscribe(exclude=("worker.state",))
        bus.publish("model.loaded", model_id="m-1", device="cpu")
        bus.publish("worker.state", device="cpu", name="m-1/unet", state="loaded")
        a, b, c = drain(everything), drain(models), drain(quiet)
        assert [f.type for f in a] == ["model.loaded", "worker.state"]
        assert [f.type for f in b] == ["model.loaded"] and [f.type for f in c] == ["model.loaded"]
        assert a[0].data is b[0].data is c[0].data  # one encoding, the same bytes for all
        kind, data = parsed(a[0])
        assert kind == "model.loaded" and data["model_id"] == "m-1" and data["type"] == "model.loaded"
        assert a[0].data.endswith(b"id: %d\n\n" % data["id"])
        for sub in (everything, models, quiet):
            sub.close()
        assert bus.subscriber_count == 0

    on_loop(test)


def test_progress_thinned_per_job_latest_wins_and_flushed_before_the_end() -> None:
    async def test(bus: EventBus) -> None:
        with bus.frames.subscribe() as sub, bus.frames.subscribe(job="j-1") as one_job:
            for done in range(1, 6):
                bus.publish("job.progress", job="j-1", progress={"done": done, "total": 5})
            bus.publish("job.progress", job="j-2", progress={"done": 1})  # another job is not held back
            bus.publish("job.succeeded", job="j-1", info={"state": "succeeded"})
            frames = drain(sub)
            seen = [(f.type, parsed(f)[1].get("job"), parsed(f)[1].get("progress")) for f in frames]
            assert seen == [
                ("job.progress", "j-1", {"done": 1, "total": 5}),  # the first goes out at once
                ("job.progress", "j-2", {"done": 1}),
                ("job.progress", "j-1", {"done": 5, "total": 5}),  # 2-4 dropped, 5 before the end
                ("job.succeeded", "j-1", None),
            ]
            # a job's own stream (the CLI follows it, printing each step) takes every progress
            assert [f.type for f in drain(one_job)] == ["job.progress"] * 5 + ["job.succeeded"]
            # after its end a job's next progress (a new run of the id) is not held back
            bus.publish("job.progress", job="j-1", progress={"done": 1})
            assert [f.type for f in drain(sub)] == ["job.progress"]

    on_loop(test)


def test_every_change_of_step_goes_out_with_the_last_step_latest_before_it() -> None:
    async def test(bus: EventBus) -> None:
        with bus.frames.subscribe() as sub:
            for step, done in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("c", 1)]:
                bus.publish("job.progress", job="j-1", progress={"step": step, "done": done})
            seen = [(p["step"], p["done"]) for p in (parsed(f)[1]["progress"] for f in drain(sub))]
            assert seen == [("a", 1), ("a", 3), ("b", 1), ("b", 2), ("c", 1)]  # a load's bar moves

    on_loop(test)


def test_a_held_progress_goes_out_when_its_interval_ends() -> None:
    async def test(bus: EventBus) -> None:
        with bus.frames.subscribe() as sub:
            bus.publish("job.progress", job="j-1", progress={"done": 1})
            bus.publish("job.progress", job="j-1", progress={"done": 2})
            bus.publish("job.progress", job="j-1", progress={"done": 3})
            first = await asyncio.wait_for(sub.next_batch(), 5)
            assert [parsed(f)[1]["progress"] for f in first] == [{"done": 1}]
            later = await asyncio.wait_for(sub.next_batch(), 5)  # held, then sent by the timer
            assert [parsed(f)[1]["progress"] for f in later] == [{"done": 3}]

    on_loop(test, progress_interval=0.01)


def test_events_without_subscribers_cost_nothing_and_hold_nothing() -> None:
    async def test(bus: EventBus) -> None:
        bus.publish("job.progress", job="j-1", progress={"done": 1})
        bus.publish("job.progress", job="j-1", progress={"done": 2})
        with bus.frames.subscribe() as sub:
            bus.publish("job.progress", job="j-1", progress={"done": 3})
            assert [parsed(f)[1]["progress"] for f in drain(sub)] == [{"done": 3}]

    on_loop(test)


class Colour(Enum):
    RED = "red"


def test_encoding_of_what_json_does_not_know() -> None:
    frame = encode_frame(
        "x.y", {"path": Path("/m/a.safetensors"), "colour": Colour.RED, "ratio": math.nan}, 7
    )
    assert frame.startswith(b"event: x.y\ndata: ") and frame.endswith(b"\nid: 7\n\n")
    data = json.loads(frame.split(b"\n")[1][6:])
    assert data == {"path": "/m/a.safetensors", "colour": "red", "ratio": None}


def test_a_subscription_holds_what_was_published_before_it_was_read() -> None:
    async def run() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        with bus.subscribe() as events:
            # a job that ends between a stream's snapshot and its first read: the end is delivered
            bus.publish("job.succeeded", job="j-1")
            event = await asyncio.wait_for(anext(events), 5)
            assert (event["type"], event["job"]) == ("job.succeeded", "j-1")
            assert bus.subscriber_count == 1
        assert bus.subscriber_count == 0
        assert [e async for e in events] == []  # closed: it ends

    asyncio.run(run())


def test_a_cancelled_reader_leaves_no_subscriber() -> None:
    async def run() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        seen: list[str] = []
        subscribed = asyncio.Event()

        async def listen() -> None:
            events = bus.subscribe()
            subscribed.set()
            async for event in events:
                seen.append(event["type"])

        reader = asyncio.create_task(listen())
        await subscribed.wait()
        bus.publish("model.loaded")
        while not seen:
            await asyncio.sleep(0)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert seen == ["model.loaded"] and bus.subscriber_count == 0

    asyncio.run(run())


def test_a_burst_of_events_wakes_each_stream_once_in_order() -> None:
    async def test(bus: EventBus) -> None:
        with bus.frames.subscribe() as one, bus.frames.subscribe(exclude=("job.progress",)) as other:
            bus.publish("job.queued", job="j-1")
            bus.publish("job.running", job="j-1")
            bus.publish("model.loading", model_id="m-1")
            bus.publish("job.progress", job="j-1", progress={"step": "unet"})
            bus.publish("model.loaded", model_id="m-1")
            bus.publish("job.succeeded", job="j-1")
            await asyncio.sleep(0)  # no flush yet: the streams' frames wait for the window
            assert len(one.frames) == 6 and not one._due
            first = await asyncio.wait_for(one.next_batch(), 5)  # one wake-up, one write: all six
            assert [parsed(f)[0] for f in first] == [
                "job.queued", "job.running", "model.loading", "job.progress", "model.loaded", "job.succeeded",
            ]  # fmt: skip
            assert [parsed(f)[0] for f in await asyncio.wait_for(other.next_batch(), 5)] == [
                "job.queued", "job.running", "model.loading", "model.loaded", "job.succeeded",
            ]  # fmt: skip
            bus.publish("model.unloaded", model_id="m-1")  # a later event: the next window
            assert [parsed(f)[0] for f in await asyncio.wait_for(one.next_batch(), 5)] == ["model.unloaded"]
            assert not one.frames and [parsed(f)[0] for f in drain(other)] == ["model.unloaded"]

    on_loop(test, coalesce=0.05)


def test_a_flush_while_the_reader_writes_loses_nothing_and_never_returns_empty() -> None:
    async def test(bus: EventBus) -> None:
        with bus.frames.subscribe() as sub:
            bus.publish("model.loaded", model_id="m-1")
            await asyncio.sleep(0)  # flushed (window 0) before the reader asks: it is due
            bus.publish("model.unloaded", model_id="m-1")  # marked again, taken with the first
            batch = await asyncio.wait_for(sub.next_batch(), 5)
            assert [parsed(f)[0] for f in batch] == ["model.loaded", "model.unloaded"]
            await asyncio.sleep(0)  # the second flush finds nothing left: the next read waits
            reader = asyncio.create_task(sub.next_batch())
            await asyncio.sleep(0.01)
            assert not reader.done()
            bus.publish("lease.granted", lease="l-1")
            assert [parsed(f)[0] for f in await asyncio.wait_for(reader, 5)] == ["lease.granted"]

    on_loop(test)
