"""What a caller may ask of a load beyond the model and the device, and what that means in bytes.

:class:`LoadOptions` carries priority, time limit, force, keep_loaded, keep_alive, reload, and the
worker-side options (compute ``dtype``, fp8 ``storage_dtype``, ``offload``) that it applies to each
component's request and that make the form a model is loaded in (``forms.py``); placement asks it how
many bytes the model will hold on a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelkeeper.orchestrator.forms import LoadForm
from modelkeeper.orchestrator.workers import Priority
from modelkeeper.protocol.messages import DType, LoadRequest
from modelkeeper.registry import ModelRecord


@dataclass
class LoadOptions:
    """What a caller may ask of a load beyond the model and the device."""

    priority: int = Priority.NORMAL
    timeout: float | None = None
    force: bool = False
    keep_loaded: bool = False
    require_cache: bool = False
    keep_alive: float | None = None  # seconds after the last use; -1 never; None: the setting
    dtype: DType | None = None  # compute dtype (a cast on load); None: the file's
    storage_dtype: DType | None = None  # kept in this dtype on the device (fp8), upcast per layer
    offload: str | int | None = None  # "none", "auto" or bytes kept resident; the rest streams from RAM
    reload: bool = False  # loaded already in another form: unload it and load it in this one

    @classmethod
    def like(cls, form: LoadForm, **others: Any) -> LoadOptions:
        """The options that load a model again in ``form`` (a kept model after its worker restarted)."""
        return cls(
            dtype=None if form.dtype is None else DType(form.dtype),
            storage_dtype=None if form.storage_dtype is None else DType(form.storage_dtype),
            offload=None if form.offload == "none" else form.offload,
            **others,
        )

    def form(self) -> LoadForm:
        """The form this load asks for (before the worker says what the file's dtypes are)."""
        return LoadForm(
            dtype=None if self.dtype is None else self.dtype.value,
            storage_dtype=None if self.storage_dtype is None else self.storage_dtype.value,
            offload="none" if self.offload is None else self.offload,
        )

    def differences(self, form: LoadForm) -> dict[str, dict[str, object]]:
        """What this load asks for that a placement loaded as ``form`` does not have (forms.py); an
        option left out asks for nothing, with ``reload`` too (it keeps the placement's value)."""
        return form.differences(
            None if self.dtype is None else self.dtype.value,
            None if self.storage_dtype is None else self.storage_dtype.value,
            self.offload,
        )

    def request(self, request: LoadRequest) -> LoadRequest:
        """A component's worker request with the load's dtype and residency options."""
        options = (("dtype", self.dtype), ("storage_dtype", self.storage_dtype), ("offload", self.offload))
        update = {k: v for k, v in options if v is not None}
        return request.model_copy(update=update) if update else request

    def resident_need(self, need: int, budget: int) -> int:
        """The bytes placement must find on a device of ``budget``, evicting for them: all ``need``
        bytes for a load that places the model whole (``none``; ``auto`` when it fits the budget;
        a byte count at least ``need``), none for a load that streams (``auto`` of a model larger
        than the budget, a smaller byte count). A streamed load evicts nothing (docs/OFFLOAD.md):
        its worker keeps resident what fits the free budget, and eviction could not make it whole."""
        if self.offload is None or self.offload == "none":
            return need
        whole = need <= budget if self.offload == "auto" else int(self.offload) >= need
        return need if whole else 0

    @property
    def may_stream(self) -> bool:
        """Whether a load finding no room for the model whole may still stream it (``auto``):
        then it evicts nothing and its worker keeps resident what fits."""
        return self.offload == "auto"

    def stored_bytes(self, record: ModelRecord) -> int:
        """What the model will hold on the device: its file's bytes, or its parameters in the
        dtype it is kept in when the load asks for one (fp8 storage: one byte each)."""
        kept = self.storage_dtype or self.dtype
        if kept is None:
            return sum(c.bytes for c in record.components)
        size = ITEM_SIZES[kept]
        return sum(min(c.bytes, c.parameters * size) if c.parameters else c.bytes for c in record.components)


ITEM_SIZES = {
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT8_E4M3FN: 1,
    DType.FLOAT8_E5M2: 1,
}
