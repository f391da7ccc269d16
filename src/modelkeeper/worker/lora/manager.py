"""The LoRAs patched into one device's modules: applied, re-strengthened and removed exactly, each
weight re-derived from its original (kept in a backup on the device or in pinned host memory).

A weight kept packed (fp8, scaled fp8, GGUF blocks: :mod:`modelkeeper.worker.storage`) is never
written: its layer decodes it as it runs, and the LoRA terms are added to the decoded weight there,
in the compute dtype (:func:`~modelkeeper.worker.storage.set_adjust`). Removal is exact by
construction (the packed bytes never change), a strength change is read at the next forward, and no
full-precision copy is held; the cost is one delta product per patched layer and forward.

A weight that lives in host memory on a CUDA worker (a streamed block of a partially resident
model, :mod:`modelkeeper.worker.streaming`) is derived on the device like any other, bit for bit,
and the result stored in a private pinned copy that the parameter then holds; its original (often a
read-only view of a RAM-cache segment) is the backup, given back on removal without a copy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from modelkeeper.worker import storage
from modelkeeper.worker.errors import AlreadyLoaded, InvalidRequest, WorkerNotLoaded
from modelkeeper.worker.lora.delta import Delta
from modelkeeper.worker.lora.matching import Match, refuse_unfit, resolve
from modelkeeper.worker.lora.parse import parse_lora, read_lora_file

BackupPlace = Literal["auto", "device", "cpu"]
GiB = 1024**3


@dataclass(eq=False)
class _Term:
    lora: _Lora
    role: str
    delta: Delta
    src: slice | None
    dst: slice | None

    def alpha(self) -> float:
        return self.lora.alpha(self)


def _add_terms(out: torch.Tensor, live: list[tuple[_Term, float]]) -> None:
    """``out += sum(alpha * delta)``, ``out`` the weight as a [rows, cols] matrix."""
    for term, alpha in live:
        term.delta.add_to(out if term.dst is None else out[term.dst], alpha, term.src)


def _live(terms: list[_Term]) -> list[tuple[_Term, float]]:
    return [(t, a) for t in terms if (a := t.alpha()) != 0.0]


@dataclass(eq=False)
class _Patched:
    """A patched weight: the parameter, its original, and the LoRA terms on it in load order."""

    param: torch.Tensor
    owner: int  # id() of the target module it belongs to
    backup: torch.Tensor
    terms: list[_Term] = field(default_factory=list)
    _views: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (data_ptr, out, base) as matrices
    #: where the weight is derived: its own device, or the worker's device for a host weight
    work: torch.device | None = None
    private: bool = False  # a host weight holds its own pinned copy (its original is the backup)

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and its original as [rows, cols] matrices on the device of the work, cached
        while the weight keeps its storage (``module.to`` gives it a new one). A weight that is not
        contiguous (channels_last), or lives on the host, is computed into a contiguous scratch matrix."""
        param = self.param
        work_device = self.work or param.device
        if self._views is None or self._views[0] != param.data_ptr() or not param.is_contiguous():
            work = (
                param
                if param.is_contiguous() and param.device == work_device
                else torch.empty(param.shape, dtype=param.dtype, device=work_device)
            )
            out = work.view(param.shape[0], -1)
            base = self.backup.to(device=work_device, dtype=param.dtype, non_blocking=True).view(out.shape)
            self._views = (param.data_ptr() if work is param else -1, out, base)
        return self._views[1], self._views[2]

    @property
    def backup_bytes(self) -> int:
        return self.backup.numel() * self.backup.element_size()

    @property
    def backup_on_device(self) -> bool:
        return self.backup.device == self.param.device

    def rederive(self) -> None:
        """``W = W0 + sum(strength * scale * delta)`` for one weight, from its original."""
        live = _live(self.terms)
        with torch.no_grad():
            out, base = self.views()
            only = live[0][0].delta if len(live) == 1 and live[0][0].src is live[0][0].dst is None else None
            if only and only.up is not None and only.down is not None and only.up.dtype == out.dtype:
                torch.addmm(base, only.up, only.down, alpha=live[0][1], out=out)  # one kernel, one rounding
            else:
                out.copy_(base)
                _add_terms(out, live)
            if out.data_ptr() != self.param.data_ptr():
                if self.work not in (None, self.param.device) and not self.private:
                    # a host weight: never written in place (it may be a read-only segment view)
                    self.param.data = torch.empty(self.param.shape, dtype=out.dtype, pin_memory=True)
                    self.private = True
                self.param.copy_(out.view(self.param.shape))

    def restore(self) -> int:
        """The original back, bitwise (the terms are gone); returns the backup's bytes, now free."""
        if self.private:
            self.param.data = self.backup  # the original host copy, as it was
            self.private = False
        else:
            with torch.no_grad():
                self.param.copy_(self.backup)
        return self.backup_bytes


@dataclass(eq=False)
class _Decoded:
    """A packed weight (fp8, GGUF): never written. Its LoRA terms are added to the weight each time
    its layer decodes it, with the strengths of that moment; with no term left the hook goes."""

    target: torch.nn.Module
    name: str  # the weight's state-dict key in ``target``
    owner: int
    terms: list[_Term] = field(default_factory=list)
    hooked: bool = False
    backup_bytes = 0
    backup_on_device = True

    def rederive(self) -> None:
        if self.terms and not self.hooked:
            storage.set_adjust(self.target, self.name, self._adjust)
            self.hooked = True
        elif not self.terms:
            self.restore()

    def restore(self) -> int:
        if self.hooked:
            storage.set_adjust(self.target, self.name, None)
            self.hooked = False
        return 0

    def _adjust(self, weight: torch.Tensor) -> torch.Tensor:
        _add_terms(weight.view(weight.shape[0], -1), _live(self.terms))
        return weight


@dataclass
class LoraReport:
    """What :meth:`LoraManager.load` did (``as_dict``: the proposed ``model.load_lora`` result)."""

    name: str
    source: str
    format: str
    strength: float
    role_strength: dict[str, float]
    roles: dict[str, dict[str, int]]
    matched_keys: int
    unmatched_keys: int
    unmatched: list[str]
    skipped_roles: list[str]
    params_patched: int
    factor_bytes: int
    backup_bytes: int
    backup_place: str
    read_seconds: float
    prepare_seconds: float
    apply_seconds: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Lora:
    name: str
    strength: float
    role_strength: dict[str, float]
    params: list[int] = field(default_factory=list)  # keys of LoraManager._patched
    factor_bytes: int = 0
    report: LoraReport | None = None

    def alpha(self, term: _Term) -> float:
        return self.role_strength.get(term.role, self.strength) * term.delta.scale


_Weight = _Patched | _Decoded


class LoraManager:
    """The LoRAs applied to one device's modules, several at once, on shared or separate modules.

    Device work (load, set_strength, remove, detach) runs on one thread at a time; ``loaded``,
    ``names`` and ``memory`` may be called from any thread. Call :meth:`detach` before unloading a
    patched module. ``backup``: where originals are kept; ``auto`` keeps them on the device while
    ``reserve_bytes`` stay free there, else in pinned host memory.
    """

    def __init__(
        self, device: torch.device | str = "cpu", *, backup: BackupPlace = "auto", reserve_bytes: int = GiB
    ) -> None:
        self.device = torch.device(device)
        self.backup = backup
        self.reserve_bytes = reserve_bytes
        self._loras: dict[str, _Lora] = {}
        self._patched: dict[int, _Weight] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._loras)

    def loaded(self) -> list[dict[str, Any]]:
        """``{name, source, format, strength, role_strength, params_patched, factor_bytes}`` per LoRA."""
        with self._lock:
            loras = list(self._loras.values())
        return [
            {"name": lo.name, "source": lo.report.source if lo.report else "", "strength": lo.strength,
             "format": lo.report.format if lo.report else "", "role_strength": dict(lo.role_strength),
             "params_patched": len(lo.params), "factor_bytes": lo.factor_bytes}
            for lo in loras
        ]  # fmt: skip

    def memory(self) -> dict[str, int]:
        """Bytes held for LoRAs: their factors, and the originals on the device and on the host."""
        with self._lock:
            factors = sum(lo.factor_bytes for lo in self._loras.values())
            backups = [(s.backup_bytes, s.backup_on_device) for s in self._patched.values()]
        device = sum(size for size, here in backups if here)
        return {"factor_bytes": factors, "backup_device_bytes": device,
                "backup_host_bytes": sum(size for size, _ in backups) - device}  # fmt: skip

    def load(
        self,
        name: str,
        source: str | Path | Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.nn.Module],
        *,
        strength: float = 1.0,
        role_strength: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        strict: bool = False,
        min_match: float = 0.5,
        check: Callable[[], None] | None = None,
        own: Callable[[set[str]], Mapping[str, torch.nn.Module]] | None = None,
    ) -> LoraReport:
        """Read ``source`` (a file, or a state dict with ``metadata``), match its layers to the
        ``targets`` (role -> module, roles of :data:`~modelkeeper.worker.lora.ROLES`: ``unet`` or
        ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``) and patch them with ``strength`` (``role_strength`` overrides per role).

        Everything is checked before any weight changes: an unreadable or unsupported file, layers
        whose shapes do not fit (another base), or fewer than ``min_match`` of the keys for the roles
        given matching a layer, leave every module as it was; with ``strict``, so does any unmatched
        key. ``check`` is called between stages (cancellation). ``own``, given the roles the file
        patches once it is checked, returns the modules to patch instead for some of them (a module
        shared by several names gets its own copy first: :meth:`ModelService.load_lora`)."""
        started = time.perf_counter()
        if name in self._loras:
            raise AlreadyLoaded(f"data.name: a LoRA named {name!r} is already applied")
        if not targets:
            raise InvalidRequest("data.targets: give at least one module to patch")
        if isinstance(source, str | Path):
            state, file_metadata = read_lora_file(source)
            label = str(source)
        else:
            state, file_metadata, label = dict(source), {}, "<state dict>"
        read_seconds = time.perf_counter() - started
        _call(check)
        fmt, layers, ignored = parse_lora(state, dict(metadata or file_metadata), label)
        matches, unmatched, skipped, mismatched = resolve(layers, targets)
        unmatched += ignored
        refuse_unfit(label, layers, matches, unmatched, mismatched, targets, 1.0 if strict else min_match)
        _call(check)
        swapped = own({m.role for m in matches}) if own is not None else {}
        if swapped:  # copies of the same weights: the same matches, on the new modules
            targets = {**targets, **swapped}
            matches, unmatched, skipped, mismatched = resolve(layers, targets)
            unmatched += ignored
        deltas: dict[int, Delta] = {}
        for match in matches:
            if id(match.layer) not in deltas:
                dtype = storage.compute_dtype(targets[match.role]) if match.packed else None
                deltas[id(match.layer)] = Delta(
                    match.layer.factors, self._work_device(match.param), dtype or match.param.dtype
                )
        lora = _Lora(name, float(strength), dict(role_strength or {}))
        lora.factor_bytes = sum(d.nbytes for d in deltas.values())
        prepared = time.perf_counter()
        _call(check)
        backup_bytes, place = self._apply(lora, matches, deltas, targets)
        self._sync()
        done = time.perf_counter()
        roles: dict[str, dict[str, int]] = {}
        for match in matches:
            roles.setdefault(match.role, {"layers": 0, "keys": 0})["layers"] += 1
        for match in {id(m.layer): m for m in matches}.values():
            roles[match.role]["keys"] += len(match.layer.keys)
        lora.report = LoraReport(
            name=name, source=label, format=fmt, strength=lora.strength, role_strength=dict(lora.role_strength),
            roles=roles, matched_keys=sum(r["keys"] for r in roles.values()), unmatched_keys=len(unmatched),
            unmatched=unmatched[:50], skipped_roles=sorted(skipped), params_patched=len(lora.params),
            factor_bytes=lora.factor_bytes, backup_bytes=backup_bytes, backup_place=place,
            read_seconds=round(read_seconds, 6), prepare_seconds=round(prepared - started - read_seconds, 6),
            apply_seconds=round(done - prepared, 6), seconds=round(done - started, 6),
        )  # fmt: skip
        with self._lock:
            self._loras[name] = lora
        return lora.report

    def set_strength(
        self, name: str, strength: float, role_strength: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """Change a LoRA's strength (and per-role overrides): its weights are re-derived from the
        originals; no file is read and no module rebuilt. ``{name, strength, previous,
        role_strength, params_patched, seconds}``."""
        started = time.perf_counter()
        lora = self._get(name)
        previous, lora.strength = lora.strength, float(strength)
        if role_strength is not None:
            lora.role_strength = dict(role_strength)
        for key in lora.params:
            self._patched[key].rederive()
        self._sync()
        return {"name": name, "strength": lora.strength, "previous": previous,
                "role_strength": dict(lora.role_strength), "params_patched": len(lora.params),
                "seconds": round(time.perf_counter() - started, 6)}  # fmt: skip

    def remove(self, name: str) -> dict[str, Any]:
        """Take a LoRA off: weights only it patched get their originals back, bitwise; weights other
        LoRAs share are re-derived without it. ``{name, params_restored, params_rederived,
        freed_bytes, seconds}``."""
        started = time.perf_counter()
        lora = self._get(name)
        restored = rederived = freed = 0
        for key in lora.params:
            state = self._patched[key]
            state.terms = [t for t in state.terms if t.lora is not lora]
            if state.terms:
                state.rederive()
                rederived += 1
            else:
                freed += state.restore()
                restored += 1
        self._sync()
        with self._lock:
            for key in lora.params:
                if not self._patched[key].terms:
                    del self._patched[key]
            del self._loras[name]
        return {"name": name, "params_restored": restored, "params_rederived": rederived,
                "freed_bytes": freed + lora.factor_bytes, "seconds": round(time.perf_counter() - started, 6)}  # fmt: skip

    def remove_all(self) -> list[str]:
        """Remove every LoRA, newest first; returns their names."""
        names = list(reversed(self.names()))
        for name in names:
            self.remove(name)
        return names

    def detach(self, module: torch.nn.Module) -> list[str]:
        """Forget ``module`` (about to be unloaded) without restoring it; LoRAs left with no weight
        are dropped. Returns the names of the LoRAs that patched it."""
        with self._lock:
            keys = [k for k, s in self._patched.items() if s.owner == id(module)]
            touched = {t.lora.name for k in keys for t in self._patched[k].terms}
            for key in keys:
                if isinstance(self._patched[key], _Decoded):
                    self._patched[key].restore()  # the hook holds only LoRA factors: let them go
                del self._patched[key]
            for lora_name in touched:
                lora = self._loras[lora_name]
                lora.params = [k for k in lora.params if k in self._patched]
                if not lora.params:
                    del self._loras[lora_name]
        return sorted(touched)

    def patches(self, module: torch.nn.Module) -> bool:
        """Whether a LoRA patches ``module`` now."""
        with self._lock:
            return any(s.owner == id(module) for s in self._patched.values())

    def _get(self, name: str) -> _Lora:
        with self._lock:
            lora = self._loras.get(name)
        if lora is None:
            raise WorkerNotLoaded(
                f"data.name: no LoRA named {name!r} is applied (applied: {self.names() or 'none'})"
            )
        return lora

    def _work_device(self, param: torch.Tensor) -> torch.device:
        """A host weight on a CUDA worker (streamed) is derived on the worker's device."""
        return self.device if param.device.type == "cpu" and self.device.type == "cuda" else param.device

    def _on_device(self, params: list[torch.Tensor]) -> bool:
        params = [p for p in params if self._work_device(p) == p.device]  # host weights keep no backup
        need = sum(p.numel() * p.element_size() for p in params)
        if not params or params[0].device.type == "cpu" or self.backup != "auto":
            return self.backup != "cpu" or not params or params[0].device.type == "cpu"
        free, _ = torch.cuda.mem_get_info(params[0].device)
        return bool(free - need > self.reserve_bytes)

    def _apply(
        self,
        lora: _Lora,
        matches: list[Match],
        deltas: dict[int, Delta],
        targets: Mapping[str, torch.nn.Module],
    ) -> tuple[int, str]:
        """Add ``lora``'s terms and re-derive the weights; on any failure undo all of it."""
        fresh = list(
            {
                id(m.param): m.param for m in matches if id(m.param) not in self._patched and not m.packed
            }.values()
        )
        on_device = self._on_device(fresh)
        created: list[int] = []
        try:
            for match in matches:
                key = _key(match, targets)
                if key not in self._patched:
                    target = targets[match.role]
                    state: _Weight
                    if match.packed:
                        state = _Decoded(target, f"{match.module}.weight", id(target))
                    else:
                        work = self._work_device(match.param)
                        host = work != match.param.device
                        backup = match.param.detach() if host else _backup(match.param, on_device)
                        state = _Patched(match.param, id(target), backup, work=work)
                    with self._lock:
                        self._patched[key] = state
                    created.append(key)
                term = _Term(lora, match.role, deltas[id(match.layer)], match.src, match.dst)
                self._patched[key].terms.append(term)
                if key not in lora.params:
                    lora.params.append(key)
            for key in lora.params:
                self._patched[key].rederive()
        except BaseException:
            for key in lora.params:
                undo = self._patched[key]
                undo.terms = [t for t in undo.terms if t.lora is not lora]
                undo.rederive()
            with self._lock:
                for key in created:
                    self._patched.pop(key).restore()
            raise
        need = sum(p.numel() * p.element_size() for p in fresh)
        return need, ("none" if not fresh else "device" if on_device else "cpu")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _key(match: Match, targets: Mapping[str, torch.nn.Module]) -> int:
    """A patched weight's key: the parameter, or for a packed weight its layer (the hook's owner,
    which stays while a streamed weight's stored tensor may change between uses)."""
    return id(targets[match.role].get_submodule(match.module)) if match.packed else id(match.param)


def _call(check: Callable[[], None] | None) -> None:
    if check is not None:
        check()


def _backup(param: torch.Tensor, on_device: bool) -> torch.Tensor:
    """An exact, contiguous copy of ``param``: on its device, or in pinned host memory."""
    with torch.no_grad():
        if on_device or param.device.type == "cpu":
            return param.detach().clone(memory_format=torch.contiguous_format)
        host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
        return host.copy_(param.detach())
