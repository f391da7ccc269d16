"""The form a model is loaded in: its compute dtype, the dtype its weights are kept in, its offload.

A load of a model already loaded (or being loaded) on a device returns that placement, unless it
asks for another form: a ``dtype``, ``storage_dtype`` or ``offload`` the placement does not have.
Such a load is refused (``LoadedDifferently``, 409) or, with ``reload``, unloads the placement and
loads the model again (docs/SERVICE.md "Loading a model already loaded"). An option a load leaves
out asks for nothing: the placement is taken as it is, and a reload keeps its value
(:meth:`LoadForm.kept_by_reload`), so that a reload changes only what it asks. A reload drops the
LoRAs applied to the placement: the 409 and the reload's result name them (:func:`applied_loras`).
``keep_alive``, ``keep_loaded`` and the priority are no part of the form: a second load updates
the first two.

What a placement has is what was asked, completed by what its worker reported: a load without
``dtype`` of a float16 file is float16, so a later ``dtype: float16`` asks for nothing new. A model
kept packed (fp8, GGUF) loaded without ``dtype`` computes in the dtype its worker chose for the
packed weights (``compute``: bfloat16 for a GGUF Flux whose parts stay float16): that dtype is its
compute dtype, shown and asked for as such. Its
offload is compared by what it placed: an offload (``auto`` or a byte count) that streamed nothing
placed the model whole, as ``none`` does, so ``none``, ``auto`` or a byte count at least as large
ask for nothing new of it; a placement that streams is only the same as the offload it was loaded
with (:meth:`LoadForm.places_alike`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from modelkeeper.orchestrator.errors import LoadedDifferently
from modelkeeper.protocol.messages import DType
from modelkeeper.sizes import format_size

Offload = str | int


class Named(Protocol):
    """What a refusal names a model by: a registry record, or a cluster model (``cluster/catalog.py``)."""

    @property
    def id(self) -> str: ...

    @property
    def handle(self) -> str: ...


@dataclass(frozen=True)
class LoadForm:
    """What a placement was loaded as: what the load asked, and the dtypes its worker reported."""

    dtype: str | None = None  # compute dtype asked; None: the file's
    storage_dtype: str | None = None  # asked; None: the compute dtype (or the file's packing)
    offload: Offload = "none"
    dtypes: tuple[str, ...] = ()  # the compute dtypes of its components, as loaded
    storages: tuple[str, ...] = ()  # the packings of those kept packed (fp8, gguf:Q8_0...), as loaded
    streams: bool | None = None  # part of it streams from RAM (offloaded); None: not loaded yet
    compute: str | None = None  # the compute dtype its worker chose for its packed components, as loaded

    def loaded(self, dtypes: list[str | None], storages: list[str | None], streams: bool) -> LoadForm:
        """This form completed with what the worker reported of each component (``dtypes`` and
        ``storages`` one entry per component, alike)."""
        packed = {d for d, s in zip(dtypes, storages, strict=True) if d and s}
        return replace(
            self,
            dtypes=tuple(sorted({d for d in dtypes if d})),
            storages=tuple(sorted({s for s in storages if s})),
            streams=streams,
            compute=packed.pop() if len(packed) == 1 else None,
        )

    @property
    def shown_dtype(self) -> str | None:
        """The compute dtype: asked, else the one the worker chose for its packed components, else
        the one every component has (None when mixed or unknown)."""
        if self.dtype is not None:
            return self.dtype
        if self.compute is not None:
            return self.compute
        return self.dtypes[0] if len(self.dtypes) == 1 else None

    @property
    def shown_storage(self) -> str | None:
        """The dtype the weights are kept in when not the compute dtype: asked, else the file's packing."""
        if self.storage_dtype is not None:
            return self.storage_dtype
        return self.storages[0] if len(self.storages) == 1 else None

    def info(self) -> dict[str, Any]:
        return {"dtype": self.shown_dtype, "storage_dtype": self.shown_storage, "offload": self.offload}

    def differences(
        self, dtype: str | None, storage_dtype: str | None, offload: Offload | None
    ) -> dict[str, dict[str, Any]]:
        """Option -> ``{"loaded": ..., "asked": ...}`` for each option a load asks for (not None)
        that this form does not have; empty when the load asks for nothing new. A reload asks
        the same: an option it leaves out keeps this form's value (:meth:`kept_by_reload`)."""
        out: dict[str, dict[str, Any]] = {}
        if (
            dtype is not None
            and dtype != self.dtype
            and not (self.dtype is None and dtype == self.shown_dtype)
        ):
            out["dtype"] = {
                "loaded": self.shown_dtype or "/".join(self.dtypes) or "the file's",
                "asked": dtype,
            }
        if (
            storage_dtype is not None
            and storage_dtype != self.storage_dtype
            and not (self.storage_dtype is None and self.storages == (storage_dtype,))
        ):
            out["storage_dtype"] = {
                "loaded": self.shown_storage or "the compute dtype",
                "asked": storage_dtype,
            }
        if offload is not None and not self.places_alike(offload):
            out["offload"] = {"loaded": self.offload, "asked": offload}
        return out

    def kept_by_reload(
        self, dtype: str | None, storage_dtype: str | None, offload: Offload | None
    ) -> dict[str, Any]:
        """The load options a reload leaves out (None), set to what this form was loaded with:
        ``LoadOptions`` fields to replace, so that the reload changes only what it asks. (Back to
        the file's dtype or no storage dtype, which a request cannot name: unload, then load.)"""
        out: dict[str, Any] = {}
        if dtype is None and self.dtype is not None:
            out["dtype"] = DType(self.dtype)
        if storage_dtype is None and self.storage_dtype is not None:
            out["storage_dtype"] = DType(self.storage_dtype)
        if offload is None and self.offload != "none":
            out["offload"] = self.offload
        return out

    def places_alike(self, offload: Offload) -> bool:
        """Whether a load asking for ``offload`` places the model as this form has it: the same
        offload; or, this form having streamed nothing (loaded whole), one that streams nothing
        either: ``none``, ``auto`` (whole when the model fits, as it does) or a byte count at least
        the one this form was loaded with (the worker streams a component only when it is larger
        than the count). A form not loaded yet (a load in flight) may still stream: ``none`` and
        ``auto`` are alike for it, a byte count only the same one."""
        if offload == self.offload:
            return True
        if self.streams:
            return False
        whole = ("none", "auto")
        if offload in whole:
            return self.streams is False or self.offload in whole
        return (
            self.streams is False
            and isinstance(self.offload, int)
            and isinstance(offload, int)
            and offload >= self.offload
        )

    def describe(self) -> str:
        """``float16``, ``float16, stored as float8_e4m3fn, offload 4.0 GB``: for messages."""
        text = self.shown_dtype or ("/".join(self.dtypes) if self.dtypes else "the file's dtype")
        if self.shown_storage:
            text += f", stored as {self.shown_storage}"
        if self.offload != "none":
            text += f", offload {shown_offload(self.offload)}"
        return text


def shown_offload(offload: Offload) -> str:
    """``auto``, ``none``, or a byte count as ``4.0 GB``: an offload in a message."""
    return format_size(offload) if isinstance(offload, int) else offload


def applied_loras(loras: Mapping[str, Mapping[str, Any]], handles: Mapping[str, str]) -> list[dict[str, Any]]:
    """``[{"lora_id", "handle", "strength"}]`` of a placement's applied LoRAs (lora id -> its entry,
    ``lora`` its name, ``strength``), named by ``handles`` (lora id -> handle; else the entry's name):
    what a reload drops."""
    return [
        {"lora_id": k, "handle": handles.get(k) or str(v.get("lora") or k), "strength": v.get("strength")}
        for k, v in sorted(loras.items())
    ]


def loras_text(loras: Sequence[Mapping[str, Any]]) -> str:
    """``tiny-sd15-kohya (strength 1), other (strength 0.5)``: LoRAs in a message."""
    return ", ".join(
        f"{x['handle']} (strength {x['strength']:g})"
        if isinstance(x["strength"], int | float)
        else str(x["handle"])
        for x in loras
    )


def asked_text(differences: dict[str, dict[str, Any]]) -> str:
    """``dtype bfloat16, storage_dtype float8_e4m3fn``: what a load asked for that differs."""
    return ", ".join(
        f"{k} {shown_offload(v['asked']) if k == 'offload' else v['asked']}" for k, v in differences.items()
    )


def loaded_differently(
    record: Named,
    device: str,
    form: LoadForm,
    differences: dict[str, dict[str, Any]],
    *,
    loading: bool = False,
    loras: Sequence[Mapping[str, Any]] = (),
) -> LoadedDifferently:
    """The 409 of a load that asks for another form than ``record`` has on ``device``; ``loras``
    (:func:`applied_loras`) are the LoRAs applied there, which a reload would drop."""
    state = "being loaded" if loading else "loaded"
    then = "wait for that load, then unload it" if loading else "unload it first"
    drops = f"; a reload drops its LoRAs {loras_text(loras)}: apply them again after it" if loras else ""
    return LoadedDifferently(
        f"{record.handle} is {state} on {device} as {form.describe()}; this load asks for "
        f"{asked_text(differences)}: {then}, or pass reload to unload it and load it again with these "
        f"options{drops}",
        model_id=record.id,
        handle=record.handle,
        device=device,
        loaded=form.info(),
        differences=differences,
        loras=[dict(x) for x in loras],
    )


__all__ = [
    "LoadForm",
    "Named",
    "Offload",
    "applied_loras",
    "asked_text",
    "loaded_differently",
    "loras_text",
    "shown_offload",
]
