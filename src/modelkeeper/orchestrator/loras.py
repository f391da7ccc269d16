"""LoRAs on loaded models: apply a registered LoRA to every placement of a model (or one device),
change its strength without a reload, take it off (the worker restores the weights exactly)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.errors import NotLoaded
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.loads import Loads
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.state import StateView
from modelkeeper.orchestrator.workers import Priority, WorkerSlot
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    LORA_ROLES,
    LoadLoraRequest,
    SetLoraStrengthRequest,
    UnloadLoraRequest,
)
from modelkeeper.registry import ModelRecord


def _answer(command: CommandType) -> type[BaseModel]:
    return COMMAND_MODELS[command][1]


#: How bases are named in messages.
BASE_NAMES = {
    "sd1": "SD1",
    "sd2": "SD2",
    "sdxl": "SDXL",
    "sdxl_refiner": "SDXL refiner",
    "sd3": "SD3",
    "flux": "Flux",
}


def _a(name: str) -> str:
    """``an SDXL``, ``a Flux``: the article as the name is spoken (S as "es", Flux as a word)."""
    return f"{'an' if name.startswith('S') else 'a'} {name}"


def naming(exc: ProtocolError, key: str, shown: str) -> ProtocolError:
    """``exc`` with the worker's key of an applied LoRA (``<lora id>@<model id>``) in its message
    replaced by what the user knows it by (``tiny-sd15-kohya on tiny-sd15@checkpoints``)."""
    exc.message = exc.message.replace(key, shown)
    exc.args = (exc.message, *exc.args[1:])
    return exc


def check_base(model: ModelRecord, lora: ModelRecord) -> None:
    """Refuse, before any worker call, a LoRA of the denoiser (UNet, transformer) whose base the
    registry knows to differ from the model's: the worker would only find it out key by key. A LoRA
    of text encoders only (a CLIP-L LoRA fits every model with a CLIP-L), or a LoRA or model of
    unknown base (or one fitting several), goes to the worker, whose error names what does not fit."""
    known = BASE_NAMES.keys()
    fits = {lora.base, *(b.value for b in lora.identification.compatible_bases)}
    info = lora.identification.lora
    denoiser = info is not None and bool({"unet", "transformer"} & set(info.targets))
    if denoiser and lora.base in known and model.base in known and model.base not in fits:
        raise ProtocolError(
            f"{lora.handle} is {_a(BASE_NAMES[lora.base])} LoRA; {model.handle} is {BASE_NAMES[model.base]}: "
            f"apply it to {_a(BASE_NAMES[lora.base])} model",
            ErrorCode.INVALID_REQUEST,
            field="lora_id",
            lora_id=lora.id,
            lora_base=lora.base,
            model_id=model.id,
            model_base=model.base,
        )


class Loras:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        loads: Loads,
        pool: WorkerPool,
        view: StateView,
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.loads = loads
        self.pool = pool
        self.view = view
        self.bus = bus

    async def apply(
        self,
        ref: str,
        lora_ref: str,
        *,
        device: str | None = None,
        strength: float = 1.0,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """Patch every placement of a loaded model (or the one on ``device``) with a registered LoRA."""
        record = await self.catalog.resolve(ref)
        lora = await self.catalog.resolve(lora_ref)
        if lora.type != "lora" or lora.path is None:
            raise ProtocolError(
                f"{lora.handle} ({lora.id}) is a {lora.type}, not a LoRA",
                ErrorCode.INVALID_REQUEST,
                field="lora_id",
                lora_id=lora.id,
            )
        check_base(record, lora)
        await self.catalog.verify_file(lora)
        out = []
        for p in self.loads.loaded(record, device):
            before = p.loras.get(lora.id)
            slot = self.pool.slot(p.device)
            name = f"{lora.id}@{p.model_id}"
            targets = {role: n for role, n in p.components.items() if role in LORA_ROLES}
            if not targets:
                raise ProtocolError(
                    f"{p.handle or p.name} has no component a LoRA patches ({', '.join(p.components)}; a LoRA "
                    f"patches {', '.join(LORA_ROLES)})",
                    ErrorCode.INVALID_REQUEST,
                    field="model_id",
                    model_id=p.model_id,
                    lora_id=lora.id,
                )
            request = LoadLoraRequest(name=name, path=lora.path, targets=targets, strength=strength)

            async def run(slot: WorkerSlot = slot, request: LoadLoraRequest = request) -> dict[str, Any]:
                if any(
                    e["name"] == request.name for q in self.view.on_device(slot.id) for e in q.loras.values()
                ):
                    await slot.call(  # applied before: re-apply
                        CommandType.UNLOAD_LORA,
                        UnloadLoraRequest(name=request.name),
                        _answer(CommandType.UNLOAD_LORA),
                        timeout=60,
                    )
                answer = await slot.call(
                    CommandType.LOAD_LORA,
                    request,
                    _answer(CommandType.LOAD_LORA),
                    timeout=self.settings.request_timeout,
                )
                return answer.model_dump(mode="json", exclude_unset=True)

            try:
                with p.in_use():
                    result = await slot.run(
                        run, priority=priority, deadline=self.loads.deadline(timeout), label=f"lora {lora.id}"
                    )
            except ProtocolError as exc:  # the worker names the LoRA by its key: say whose it is
                raise naming(exc, name, f"{lora.handle} on {p.handle or p.name}") from None
            p.loras[lora.id] = {"name": name, "lora": lora.name, "strength": strength}
            if before is not None:  # applied again: the same LoRA, its strength set anew
                result["already_applied"] = True
                result["message"] = (
                    f"{lora.handle} was already applied to {p.handle or p.name} on {p.device}; "
                    f"strength set to {strength:g} (was {before['strength']:g})"
                )
            unshared = result.get("unshared") or []
            for label in [label for label, n in p.components.items() if n in unshared]:
                p.shares.pop(label, None)  # its own copy now (or its module shared no more)
            if unshared:
                await slot.status()  # a copy holds more of the device
            out.append({"device": p.device, **result})
            self.bus.publish(
                "model.lora", model_id=p.model_id, device=p.device, lora_id=lora.id, strength=strength
            )
        await self.catalog.record(record.id, "lora.apply", {"lora_id": lora.id, "strength": strength})
        return {"model_id": record.id, "lora_id": lora.id, "applied": out}

    async def strength(
        self, ref: str, lora_ref: str, strength: float, device: str | None = None
    ) -> dict[str, Any]:
        return await self._each(ref, lora_ref, device, strength)

    async def remove(self, ref: str, lora_ref: str, device: str | None = None) -> dict[str, Any]:
        return await self._each(ref, lora_ref, device, None)

    async def _each(
        self, ref: str, lora_ref: str, device: str | None, strength: float | None
    ) -> dict[str, Any]:
        """Set the strength of (``strength``) or remove (None) an applied LoRA on each placement."""
        record = await self.catalog.resolve(ref)
        lora = await self.catalog.resolve(lora_ref)
        held = [p for p in self.loads.loaded(record, device) if lora.id in p.loras]
        if not held:
            raise NotLoaded(
                f"LoRA {lora.handle} ({lora.id}) is not applied to {record.handle} ({record.id})"
                + (f" on {device}" if device else ""),
                lora_id=lora.id,
                model_id=record.id,
                handle=record.handle,
            )
        out = []
        for p in held:
            slot = self.pool.slot(p.device)
            name = p.loras[lora.id]["name"]
            command = CommandType.UNLOAD_LORA if strength is None else CommandType.SET_LORA_STRENGTH
            request: BaseModel = (
                UnloadLoraRequest(name=name)
                if strength is None
                else SetLoraStrengthRequest(name=name, strength=strength)
            )

            async def run(
                slot: WorkerSlot = slot, command: CommandType = command, request: BaseModel = request
            ) -> BaseModel:
                return await slot.call(command, request, _answer(command), timeout=60)

            with p.in_use():
                answer = await slot.run(
                    run, priority=Priority.HIGH, deadline=self.loads.deadline(None), label=f"lora {lora.id}"
                )
            if strength is None:
                del p.loras[lora.id]
            else:
                p.loras[lora.id]["strength"] = strength
            self.bus.publish(  # a change of the view: the status snapshot is rebuilt
                "model.lora", model_id=p.model_id, device=p.device, lora_id=lora.id, strength=strength
            )
            out.append({"device": p.device, **answer.model_dump(mode="json", exclude_unset=True)})
        return {"model_id": record.id, "lora_id": lora.id, "devices": out}
