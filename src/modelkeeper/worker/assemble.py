"""Build a ``torch.nn.Module`` from a config and a state dict with no random init and no second copy.

The module is constructed with its parameters on the meta device (``accelerate.init_empty_weights``),
then given the loaded tensors with ``load_state_dict(assign=True)``: the tensors read from the
file *are* the parameters. Only classes on the allowlist below can be built.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from modelkeeper.formats.errors import InvalidModelFile, UnsupportedFormat
from modelkeeper.protocol.messages import ModelKind

#: Which classes each kind may be built as. Diffusers configs name theirs in ``_class_name``;
#: transformers configs in ``architectures`` (T5 checkpoints name the full model; the encoder is built).
DIFFUSERS_CLASSES: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.UNET: ("UNet2DConditionModel",),
    ModelKind.VAE: ("AutoencoderKL",),
    ModelKind.TRANSFORMER: ("SD3Transformer2DModel", "FluxTransformer2DModel"),
    ModelKind.CONTROLNET: ("ControlNetModel",),
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
ARCHITECTURE_ALIASES = {"T5ForConditionalGeneration": "T5EncoderModel", "T5Model": "T5EncoderModel"}


def class_name_for(kind: ModelKind, config: dict[str, Any], *, has_projection: bool | None = None) -> str:
    """The class to build for ``kind`` from ``config``; raises UnsupportedFormat off the allowlist."""
    if kind in DIFFUSERS_CLASSES:
        allowed = DIFFUSERS_CLASSES[kind]
        name = str(config.get("_class_name") or allowed[0])
        if name not in allowed:
            raise UnsupportedFormat(
                f"config class {name!r} cannot be loaded as {kind.value} (allowed: {', '.join(allowed)})"
            )
        return name
    if kind is not ModelKind.TEXT_ENCODER:
        raise UnsupportedFormat(f"models of type {kind.value!r} are not built from weights")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    name = ARCHITECTURE_ALIASES.get(str(archs[0]), str(archs[0])) if archs else ""
    if model_type == "t5":
        return "T5EncoderModel"
    if model_type not in ("clip_text_model", "clip"):
        raise UnsupportedFormat(
            f"text encoder model_type {model_type!r} is not supported (clip_text_model, t5)"
        )
    if has_projection is not None:
        return "CLIPTextModelWithProjection" if has_projection else "CLIPTextModel"
    return name if name in TEXT_ENCODER_CLASSES else "CLIPTextModel"


def _construct(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    if class_name in TEXT_ENCODER_CLASSES:
        import transformers
        from accelerate import init_empty_weights

        cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
        model_type = "clip_text_model" if class_name.startswith("CLIP") else "t5"
        cfg_dict.pop("model_type", None)
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        # transformers models keep small non-persistent buffers (position ids): build those for real
        with init_empty_weights(include_buffers=False):
            module: torch.nn.Module = getattr(transformers, class_name)(hf_config)
        return module
    import diffusers

    cls = getattr(diffusers, class_name)
    with torch.device("meta"):  # thread-local, so skeletons can be built in the background
        return cls.from_config(config)  # type: ignore[no-any-return]


def skeleton(class_name: str, config: dict[str, Any], *, path: str = "") -> torch.nn.Module:
    """``class_name`` built from ``config`` with its parameters on the meta device."""
    try:
        return _construct(class_name, config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidModelFile(f"{path}: config does not build a {class_name}: {exc}", path=path) from None


class SkeletonPool:
    """Meta-device skeletons built ahead of need, ``depth`` per (class, config), so that the next
    loads of the same architecture (model switches, even back to back) do not pay for Python-side
    construction.

    Only diffusers classes are prebuilt (their construction is thread-safe under the thread-local
    meta device); ``take`` builds on the spot when none is ready.
    """

    def __init__(self, max_keys: int = 8, depth: int = 1) -> None:
        self._ready: dict[str, list[Future[torch.nn.Module]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skeleton")
        self._max = max_keys
        self._depth = depth

    @staticmethod
    def key(class_name: str, config: dict[str, Any]) -> str:
        return class_name + json.dumps(config, sort_keys=True, default=str)

    def prefetch(self, class_name: str, config: dict[str, Any]) -> None:
        if class_name in TEXT_ENCODER_CLASSES:
            return
        key = self.key(class_name, config)
        with self._lock:
            ready = self._ready.setdefault(key, [])
            while len(self._ready) > self._max:
                self._ready.pop(next(k for k in self._ready if k != key))
            while len(ready) < self._depth:
                ready.append(self._pool.submit(skeleton, class_name, dict(config)))

    def take(self, class_name: str, config: dict[str, Any], *, path: str = "") -> Future[torch.nn.Module]:
        """A skeleton: the prebuilt one, else one being built in the background (diffusers classes)
        while the caller reads the weights, else (transformers classes) one built now."""
        with self._lock:
            ready = self._ready.get(self.key(class_name, config))
            fut = ready.pop(0) if ready else None
        if fut is not None:
            return fut
        if class_name in TEXT_ENCODER_CLASSES:
            done: Future[torch.nn.Module] = Future()
            try:
                done.set_result(skeleton(class_name, config, path=path))
            except InvalidModelFile as exc:
                done.set_exception(exc)
            return done
        return self._pool.submit(skeleton, class_name, dict(config), path=path)


def build_module(
    class_name: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
    *,
    path: str = "",
    module: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """Adopt ``state`` as the tensors of a meta-device ``class_name`` (built here unless given)."""
    if module is None:
        module = skeleton(class_name, config, path=path)
    expected = module.state_dict()
    if class_name in TEXT_ENCODER_CLASSES:
        state = _rename_for_transformers(module, state, expected)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InvalidModelFile(
            f"{path}: {len(unexpected)} tensor(s) do not belong to {class_name}: {', '.join(unexpected[:5])}",
            path=path,
            unexpected=unexpected[:50],
        )
    mismatched = [
        f"{k} {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise InvalidModelFile(
            f"{path}: shapes do not match the {class_name} config: {'; '.join(mismatched[:5])}", path=path
        )
    _adopt(module, state)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    tie = getattr(module, "tie_weights", None)
    if missing and callable(tie):
        tie()  # files often store a tied weight once (T5's shared embedding)
        missing = [n for n, p in module.named_parameters() if p.is_meta]
    missing += [n for n, b in module.named_buffers() if b.is_meta]
    if missing:
        raise InvalidModelFile(
            f"{path}: {len(missing)} weight(s) of {class_name} are missing from the file: {', '.join(missing[:5])}",
            path=path,
            missing=missing[:50],
        )
    if any(b.device != device for b in module.buffers()):
        module.to(device)  # small buffers built on the CPU; parameters are already there
    module.eval()
    return module


def _adopt(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(assign=True)`` without its per-module Python machinery: each tensor
    becomes the parameter (frozen) or buffer it names. Keys were checked against the module."""
    owners = dict(module.named_modules())
    for key, tensor in state.items():
        prefix, _, attr = key.rpartition(".")
        owner = owners[prefix]
        if attr in owner._parameters:
            owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor


def _rename_for_transformers(
    module: torch.nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply the key renamings transformers itself applies when loading (v5 moved some prefixes).

    Only renamings are applied; a checkpoint that needs tensor conversions is refused."""
    if all(k in expected for k in state):
        return state
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(module)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(module, "base_model_prefix", None)
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new_key, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if converter is not None:
            raise UnsupportedFormat(f"tensor {key!r} needs a conversion this worker does not apply")
        renamed[new_key] = tensor
    return renamed


def module_stats(module: torch.nn.Module) -> tuple[int, int, int, str | None]:
    """(bytes, parameters, tensors, dtype) counting each storage once (tied weights included)."""
    seen: set[int] = set()
    nbytes = params = count = 0
    dtypes: dict[str, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        nbytes += tensor.numel() * tensor.element_size()
        count += 1
        if isinstance(tensor, torch.nn.Parameter):
            params += tensor.numel()
            name = str(tensor.dtype).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + tensor.numel()
    dtype = max(dtypes, key=lambda d: dtypes[d]) if dtypes else None
    return nbytes, params, count, dtype
