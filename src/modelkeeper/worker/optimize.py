"""Optimisations of a live module, recorded so that they can be reverted.

Options (all optional; unknown ones or bad values are refused before anything changes):

- ``dtype``: ``float32`` | ``float16`` | ``bfloat16``: cast parameters and buffers (reports whether
  the cast was lossless, i.e. whether reverting restores the same bits). Refused on a module kept
  packed (fp8, scaled fp8, GGUF): its compute dtype is chosen at load (the load's ``dtype``).
- ``channels_last``: ``true`` / ``false``: memory format of 4-D weights (convolutions).
- ``attention``: ``sdpa`` (PyTorch's scaled_dot_product_attention: diffusers ``AttnProcessor2_0``,
  transformers ``attn_implementation="sdpa"``) or ``default`` (the plain math processors).
- ``vae_slicing``, ``vae_tiling``: ``true`` / ``false``: decode a batch slice by slice / in tiles.
- ``compile``: ``false`` (default) or ``true`` or a dict of ``torch.compile`` options, applied in
  place (``nn.Module.compile``), undone by :func:`revert`.

An option that does not apply to the module (slicing on a UNet) is skipped with the reason. The
report gives bytes and device memory before and after and, with ``measure``, a quick latency
comparison through :func:`modelkeeper.worker.bench.benchmark` (small resolution, few steps), both
sides warm alike; when nothing applied there is no "after" and no speedup (the service refuses a
call with no option at all before it reaches a worker).

Proposed protocol: ``model.optimize_model`` data ``{name, options: {...}, measure: true,
revert: false}`` (``revert: true`` undoes the recorded optimisations instead); result
:meth:`OptimizeReport.as_dict` ``{class_name, applied: [{option, before, after, lossless?}],
skipped: [{option, reason}], bytes_before, bytes_after, memory_before, memory_after,
latency_before_s, latency_after_s, speedup, seconds}``. (``model.optimize_memory`` keeps its
meaning: freeing memory.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch

from modelkeeper.protocol.messages import OPTIMIZE_OPTIONS, optimize_option_problem
from modelkeeper.worker.errors import Cancelled, InvalidRequest
from modelkeeper.worker.storage import stored_forms
from modelkeeper.worker.validate import Step, no_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPTIONS = tuple(OPTIMIZE_OPTIONS)  # dtype, channels_last, attention, vae_slicing, vae_tiling, compile
ATTENTION = ("sdpa", "default")


@dataclass
class Undo:
    """What :func:`optimize` changed, with the values needed to change it back."""

    dtype: torch.dtype | None = None
    channels_last: bool | None = None  # the previous setting
    processors: dict[str, Any] | None = None
    attn_implementation: str | None = None
    vae_slicing: bool | None = None
    vae_tiling: bool | None = None
    compiled: bool = False


@dataclass
class OptimizeReport:
    class_name: str
    applied: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    bytes_before: int
    bytes_after: int
    memory_before: int
    memory_after: int
    latency_before_s: float | None
    latency_after_s: float | None
    speedup: float | None
    seconds: float
    undo: Undo = field(default_factory=Undo, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("undo")
        return data


def check_options(module: torch.nn.Module, options: Mapping[str, Any]) -> None:
    """Refuse unknown options and bad values (naming the field) before anything changes; and a
    ``dtype`` on a module whose weights are kept packed (fp8, scaled fp8, GGUF): a cast would turn
    the packed bytes into numbers its decode hooks no longer read (the compute dtype is the load's)."""
    problem = optimize_option_problem(dict(options))
    if problem is not None:
        option, why = problem
        raise InvalidRequest(f"data.options.{option}: {why}; {type(module).__name__} was not changed")
    forms = stored_forms(module)
    if "dtype" in options and forms:
        packing = ", ".join(sorted(set(forms.values())))
        raise InvalidRequest(
            f"data.options.dtype: {type(module).__name__} is stored packed ({packing}): a cast would "
            f"break its decoding; load it with a dtype instead; {type(module).__name__} was not changed"
        )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _device_memory(module: torch.nn.Module) -> int:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def _latency(module: torch.nn.Module, *, cold: bool = False, step: Step = no_step) -> float | None:
    """Seconds of a small forward pass (the parts' medians summed); None for a module the benchmark
    cannot drive. ``cold``: the module has not run since it was loaded, so one untimed benchmark goes
    first: its first passes fault its weights in from the segment and build the kernels' caches,
    costs the measurement after the change never sees. Both sides are then measured warm, alike."""
    from modelkeeper.worker.bench import benchmark

    resolution = 64 if "Text" not in type(module).__name__ else None
    try:
        if cold:
            benchmark(module, resolution=resolution, steps=1, warmup=1, tokens=16, step=step)
        report = benchmark(module, resolution=resolution, steps=5, warmup=2, tokens=16, step=step)
    except InvalidRequest:
        return None
    return sum(f.median_s for f in report.figures)


def optimize(
    module: torch.nn.Module, options: Mapping[str, Any], *, measure: bool = True, step: Step = no_step
) -> OptimizeReport:
    """Apply ``options`` to ``module`` in place; the report's ``undo`` feeds :func:`revert`. With
    ``measure``, the latency before and after (measured alike, see :func:`_latency`); when nothing
    applied (every option skipped, or none given) there is no after and no speedup: nothing changed.
    ``step`` runs before each option and each measuring pass and may raise (cancellation): what
    was applied by then is reverted first, so a cancelled optimisation leaves the module as it was."""
    check_options(module, options)
    started = time.perf_counter()
    bytes_before, memory_before = module_bytes(module), _device_memory(module)
    latency_before = _latency(module, cold=True, step=step) if measure and options else None
    undo = Undo()
    applied: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    asked = [option for option in OPTIONS if option in options]
    try:
        for i, option in enumerate(asked):
            step(option, i, len(asked))
            reason = _APPLY[option](module, options[option], undo, applied)
            if reason:
                skipped.append({"option": option, "reason": reason})
        latency_after = _latency(module, step=step) if measure and applied else None
    except Cancelled:
        revert(module, undo)
        raise
    speedup = latency_before / latency_after if latency_before and latency_after else None
    return OptimizeReport(
        type(module).__name__, applied, skipped, bytes_before, module_bytes(module), memory_before,
        _device_memory(module), latency_before, latency_after, speedup, round(time.perf_counter() - started, 6),
        undo,
    )  # fmt: skip


def _main_dtype(module: torch.nn.Module) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None


def _dtype(module: torch.nn.Module, value: str, undo: Undo, applied: list[dict[str, Any]]) -> str | None:
    target, before = DTYPES[value], _main_dtype(module)
    if before is None or before == target:
        return f"already {value}" if before else "no floating parameters"
    with torch.no_grad():
        lossless = all(
            torch.equal(t.to(target).to(t.dtype), t)
            for t in [*module.parameters(), *module.buffers()]
            if t.is_floating_point()
        )
    torch.nn.Module.to(module, target)  # not ModelMixin.to: it logs about fp32 modules for plain casts
    undo.dtype = before if undo.dtype is None else undo.dtype
    applied.append({"option": "dtype", "before": str(before).removeprefix("torch."), "after": value,
                    "lossless": lossless})  # fmt: skip
    return None


def _channels_last(
    module: torch.nn.Module, value: bool, undo: Undo, applied: list[dict[str, Any]]
) -> str | None:
    convs = [p for p in module.parameters() if p.dim() == 4]
    if not convs:
        return "no 4-D weights"
    before = all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    if before == value:
        return f"already {'channels_last' if value else 'contiguous'}"
    _memory_format(module, value)
    undo.channels_last = before
    applied.append({"option": "channels_last", "before": before, "after": value})
    return None


def _memory_format(module: torch.nn.Module, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cast(Any, module).to(memory_format=fmt)  # nn.Module.to accepts it; the stubs do not say so


def _attention(module: torch.nn.Module, value: str, undo: Undo, applied: list[dict[str, Any]]) -> str | None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = getattr(module, "attn_processors", None)
    if isinstance(processors, dict) and processors:
        kinds = {type(p) for p in processors.values()}
        if not kinds <= {AttnProcessor, AttnProcessor2_0}:
            return f"uses its own processors ({', '.join(sorted(k.__name__ for k in kinds))})"
        wanted = AttnProcessor2_0 if value == "sdpa" else AttnProcessor
        if kinds == {wanted}:
            return f"already {value}"
        undo.processors = dict(processors)
        module.set_attn_processor(wanted())  # type: ignore[operator]
        applied.append({"option": "attention", "before": "+".join(sorted(k.__name__ for k in kinds)),
                        "after": wanted.__name__})  # fmt: skip
        return None
    config = getattr(module, "config", None)
    setter = getattr(module, "set_attn_implementation", None)
    if config is None or not callable(setter):
        return "no attention processors"
    before, after = str(config._attn_implementation), "sdpa" if value == "sdpa" else "eager"
    if before == after:
        return f"already {after}"
    setter(after)
    undo.attn_implementation = before
    applied.append({"option": "attention", "before": before, "after": after})
    return None


def _vae_flag(name: str) -> Any:
    def apply(module: torch.nn.Module, value: bool, undo: Undo, applied: list[dict[str, Any]]) -> str | None:
        attribute = "use_" + name.removeprefix("vae_")
        if not hasattr(module, attribute):
            return f"{type(module).__name__} has no {name.removeprefix('vae_')}"
        before = bool(getattr(module, attribute))
        if before == value:
            return f"already {'on' if value else 'off'}"
        setattr(module, attribute, value)
        setattr(undo, name, before)
        applied.append({"option": name, "before": before, "after": value})
        return None

    return apply


def _compile(
    module: torch.nn.Module, value: bool | dict[str, Any], undo: Undo, applied: list[dict[str, Any]]
) -> str | None:
    if value is False:
        return "not asked" if getattr(module, "_compiled_call_impl", None) is None else "left compiled"
    module.compile(**(value if isinstance(value, dict) else {}))
    undo.compiled = True
    applied.append({"option": "compile", "before": False, "after": True})
    return None


_APPLY: dict[str, Any] = {
    "dtype": _dtype, "channels_last": _channels_last, "attention": _attention,
    "vae_slicing": _vae_flag("vae_slicing"), "vae_tiling": _vae_flag("vae_tiling"), "compile": _compile,
}  # fmt: skip


def revert(module: torch.nn.Module, undo: Undo) -> list[str]:
    """Undo what :func:`optimize` recorded in ``undo``; returns the options reverted. A dtype
    reported ``lossless`` comes back bitwise; a lossy one comes back at the original dtype."""
    done: list[str] = []
    if undo.compiled:
        module._compiled_call_impl = None
        done.append("compile")
    if undo.vae_tiling is not None:
        setattr(module, "use_tiling", undo.vae_tiling)  # noqa: B010
        done.append("vae_tiling")
    if undo.vae_slicing is not None:
        setattr(module, "use_slicing", undo.vae_slicing)  # noqa: B010
        done.append("vae_slicing")
    if undo.processors is not None:
        module.set_attn_processor(undo.processors)  # type: ignore[operator]
        done.append("attention")
    if undo.attn_implementation is not None:
        module.set_attn_implementation(undo.attn_implementation)  # type: ignore[operator]
        done.append("attention")
    if undo.channels_last is not None:
        _memory_format(module, undo.channels_last)
        done.append("channels_last")
    if undo.dtype is not None:
        torch.nn.Module.to(module, undo.dtype)
        done.append("dtype")
    return done


__all__ = [
    "ATTENTION",
    "DTYPES",
    "OPTIONS",
    "OptimizeReport",
    "Undo",
    "check_options",
    "module_bytes",
    "optimize",
    "revert",
]
