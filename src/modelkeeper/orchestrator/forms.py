"""The form a model is loaded in: its compute dtype, the dtype its weights are kept in, its offload.

A load of a model already loaded (or being loaded) on a device returns that placement, unless it
asks for another form: a ``dtype``, ``storage_dtype`` or ``offload`` the placement does not have.
Such a load is refused (``LoadedDifferently``, 409) or, with ``reload``, unloads the placement and
loads the model again (docs/SERVICE.md "Loading a model already loaded"). An option a load leaves
out asks for nothing: the placement is taken as it is. ``keep_alive``, ``keep_loaded`` and the
priority are no part of the form: a second load updates the first two.

What a placement has is what was asked, completed by what its worker reported: a load without
``dtype`` of a float16 file is float16, so a later ``dtype: float16`` asks for nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

from modelkeeper.orchestrator.errors import LoadedDifferently

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
    streams: bool = False  # part of it streams from RAM (offloaded)

    def loaded(self, dtypes: list[str | None], storages: list[str | None], streams: bool) -> LoadForm:
        """This form completed with what the worker reported of each component."""
        return replace(
            self,
            dtypes=tuple(sorted({d for d in dtypes if d})),
            storages=tuple(sorted({s for s in storages if s})),
            streams=streams,
        )

    @property
    def shown_dtype(self) -> str | None:
        """The compute dtype: asked, else the one every component has (None when mixed or unknown)."""
        if self.dtype is not None:
            return self.dtype
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
        self, dtype: str | None, storage_dtype: str | None, offload: Offload | None, *, whole: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Option -> ``{"loaded": ..., "asked": ...}`` for each option a load asks for (not None)
        that this form does not have; empty when the load asks for nothing new. ``whole`` (a
        reload): an option left out asks for its default (the file's dtype, no storage dtype, no
        offload), so a reload can also go back to them."""
        out: dict[str, dict[str, Any]] = {}
        if whole:
            if dtype is None and self.dtype is not None:
                out["dtype"] = {"loaded": self.dtype, "asked": "the file's"}
            if storage_dtype is None and self.storage_dtype is not None:
                out["storage_dtype"] = {"loaded": self.storage_dtype, "asked": "the compute dtype"}
            offload = "none" if offload is None else offload
        if dtype is not None and dtype != self.dtype and not (self.dtype is None and self.dtypes == (dtype,)):
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
        if offload is not None and offload != self.offload and not self._whole_either_way(offload):
            out["offload"] = {"loaded": self.offload, "asked": offload}
        return out

    def _whole_either_way(self, offload: Offload) -> bool:
        """``none`` and ``auto`` both hold a model whole that fits: the same when nothing streams."""
        return not self.streams and {offload, self.offload} <= {"none", "auto"}

    def describe(self) -> str:
        """``float16``, ``float16 kept as float8_e4m3fn, offload auto``: for messages."""
        text = self.shown_dtype or ("/".join(self.dtypes) if self.dtypes else "the file's dtype")
        if self.shown_storage:
            text += f" kept as {self.shown_storage}"
        if self.offload != "none":
            text += f", offload {self.offload}"
        return text


def asked_text(differences: dict[str, dict[str, Any]]) -> str:
    """``dtype bfloat16, storage_dtype float8_e4m3fn``: what a load asked for that differs."""
    return ", ".join(f"{k} {v['asked']}" for k, v in differences.items())


def loaded_differently(
    record: Named,
    device: str,
    form: LoadForm,
    differences: dict[str, dict[str, Any]],
    *,
    loading: bool = False,
) -> LoadedDifferently:
    """The 409 of a load that asks for another form than ``record`` has on ``device``."""
    state = "being loaded" if loading else "loaded"
    then = "wait for that load, then unload it" if loading else "unload it first"
    return LoadedDifferently(
        f"{record.handle} is {state} on {device} as {form.describe()}; this load asks for "
        f"{asked_text(differences)}: {then}, or pass reload to unload it and load it again with these options",
        model_id=record.id,
        handle=record.handle,
        device=device,
        loaded=form.info(),
        differences=differences,
    )


__all__ = ["LoadForm", "Named", "Offload", "asked_text", "loaded_differently"]
