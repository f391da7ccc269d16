"""The records of one device's work: a loaded model (:class:`LoadedModel`) and a device operation
(:class:`Operation`).

They are apart from the service so that the parts that act on them (the service, the load path in
:mod:`.loading`, the sharing of parts in :mod:`.sharing`) read one definition without importing
each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.protocol.messages import EventType, LoadedModelInfo, LoadRequest, ModelKind
from modelkeeper.worker import assemble, streaming
from modelkeeper.worker.errors import Cancelled

#: Where the service sends its events (the protocol server's ``emit``): type, request id, data.
EventSink = Callable[[EventType, str | None, dict[str, Any]], None]
#: A step's progress events are sent at most this often (a tiny model runs thousands of passes a second).
STEP_EVENT_S = 0.1


@dataclass
class Operation:
    """A running or queued device operation: its id, cancellation flag and progress."""

    request_id: str
    type: str
    name: str | None = None
    started_at: float = field(default_factory=time.time)
    progress: dict[str, Any] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Where :meth:`step` sends its progress events (the server's ``emit``); None: kept, not sent.
    emit: EventSink | None = field(default=None, repr=False)
    _last_event: float = field(default=0.0, repr=False)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"{self.type} of {self.name!r} was cancelled (request {self.request_id})")

    def step(self, stage: str, done: int, total: int) -> None:
        """Before each step of a long operation (a benchmark pass, a validation check, an
        optimisation): stop here if cancelled (:class:`Cancelled`), else record the progress
        (``stage``, ``done`` of ``total`` steps) and send it as a progress event, the first step at
        once and the others at most every ``STEP_EVENT_S``. A cancel so takes effect within one step."""
        self.check()
        self.progress = {"stage": stage, "done": done, "total": total, "unit": "steps"}
        now = time.monotonic()
        if self.emit is not None and (done == 0 or now - self._last_event >= STEP_EVENT_S):
            self._last_event = now
            self.emit(EventType.PROGRESS, self.request_id, dict(self.progress))


@dataclass
class LoadedModel:
    """A model (or a tokenizer) loaded under one name on the device: its live module, what the
    status reports of it, and what its unload gives back."""

    name: str
    kind: ModelKind
    class_name: str
    module: Any  # torch.nn.Module, or a tokenizer
    device: str
    dtype: str | None
    nbytes: int
    parameters: int
    tensors: int
    load_seconds: float
    source: dict[str, Any]
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    #: The module's skeleton (expected shapes, owners) and its config: given back to the pool at
    #: unload, so the next load of the same architecture builds nothing.
    skeleton: assemble.Skeleton | None = None
    config: dict[str, Any] | None = None
    #: Partial residency (``offload``): the streamer that keeps part of the weights on the host.
    streamer: streaming.Streamer | None = None
    #: The key other loads share this module by (:mod:`.sharing`); None once a LoRA or an
    #: optimisation changed it, and for a module never shared.
    share: str | None = None
    #: The request it was loaded by: what a copy of a shared module is loaded again from.
    request: LoadRequest | None = None

    @property
    def device_bytes(self) -> int:
        """What the model holds against the budget: all its bytes, or (offloaded) its resident
        weights and its ring."""
        return self.nbytes if self.streamer is None else self.streamer.device_bytes

    def info(self) -> LoadedModelInfo:
        stream = self.streamer
        return LoadedModelInfo(
            name=self.name, type=self.kind.value, class_name=self.class_name, device=self.device,
            dtype=self.dtype, bytes=self.nbytes, parameters=self.parameters, tensors=self.tensors,
            load_seconds=round(self.load_seconds, 6), loaded_at=self.loaded_at, last_used=self.last_used,
            source=self.source, resident_bytes=self.nbytes if stream is None else stream.resident_bytes,
            streamed_bytes=0 if stream is None else stream.streamed_bytes, device_bytes=self.device_bytes,
            streaming=None if stream is None else stream.describe(), share=self.share,
        )  # fmt: skip
