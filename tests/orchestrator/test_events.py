"""The event bus's subscriptions: made when ``subscribe()`` returns, ended when closed or cancelled."""

from __future__ import annotations

import asyncio

from modelkeeper.orchestrator.events import EventBus


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
