"""Build a ``torch.nn.Module`` from a config and a state dict with no random init and no second copy.

The module is constructed with its parameters on the meta device (``accelerate.init_empty_weights``),
then given the loaded tensors with ``load_state_dict(assign=True)``: the tensors read from the
file *are* the parameters. Only classes on the allowlist below can be built.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass
class Skeleton:
    """A meta-device module and what loads check against, computed once per module: the shape of
    every tensor its state dict expects, and which submodule owns each (parameter or buffer).

    A skeleton is used by one load; an unloaded module whose tensors are stripped back to the meta
    device becomes a skeleton again (``SkeletonPool.give_back``), so switching between models of
    one architecture costs no construction at all.
    """

    module: torch.nn.Module
    expected: dict[str, tuple[int, ...]]
    owners: dict[str, tuple[torch.nn.Module, str, bool]]  # key -> (owner, attribute, is a parameter)

    @classmethod
    def prepare(cls, module: torch.nn.Module) -> Skeleton:
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        modules = dict(module.named_modules())
        owners: dict[str, tuple[torch.nn.Module, str, bool]] = {}
        for key in expected:
            prefix, _, attr = key.rpartition(".")
            owner = modules[prefix]
            owners[key] = (owner, attr, attr in owner._parameters)
        module.eval()
        return cls(module, expected, owners)

    def strip(self) -> None:
        """Give every tensor back to the meta device (the module keeps its shapes, frees its memory)."""
        for key, (owner, attr, is_param) in self.owners.items():
            old = owner._parameters[attr] if is_param else owner._buffers[attr]
            dtype = old.dtype if old is not None else torch.float32
            meta = torch.empty(self.expected[key], dtype=dtype, device="meta")
            if is_param:
                owner._parameters[attr] = torch.nn.Parameter(meta, requires_grad=False)
            else:
                owner._buffers[attr] = meta


class SkeletonPool:
    """Skeletons ready for the next loads, ``depth`` per (class, config).

    Two sources: unloaded modules given back (``give_back``: their tensors stripped to the meta
    device), and meta-device builds in a background thread (``prefetch``, which the worker calls
    once it has been idle for a moment, so no build competes with a load for the interpreter).
    Only diffusers classes are built in the background (their construction is thread-safe under the
    thread-local meta device); ``take`` builds on the spot when none is ready.
    """

    def __init__(self, max_keys: int = 8, depth: int = 1) -> None:
        self._ready: dict[str, list[Future[Skeleton]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skeleton")
        self._max = max_keys
        self._depth = depth
        self.recycled = 0

    @staticmethod
    def key(class_name: str, config: dict[str, Any]) -> str:
        return class_name + json.dumps(config, sort_keys=True, default=str)

    def _slot(self, key: str) -> list[Future[Skeleton]]:
        ready = self._ready.setdefault(key, [])
        while len(self._ready) > self._max:
            self._ready.pop(next(k for k in self._ready if k != key))
        return ready

    def wants(self, class_name: str, config: dict[str, Any]) -> bool:
        """Whether a prefetch of this architecture would build anything."""
        if class_name in TEXT_ENCODER_CLASSES:
            return False
        with self._lock:
            return len(self._ready.get(self.key(class_name, config), [])) < self._depth

    def prefetch(self, class_name: str, config: dict[str, Any]) -> None:
        if class_name in TEXT_ENCODER_CLASSES:
            return
        key = self.key(class_name, config)
        with self._lock:
            ready = self._slot(key)
            while len(ready) < self._depth:
                ready.append(self._pool.submit(_prepared, class_name, dict(config)))

    def give_back(self, class_name: str, config: dict[str, Any], skeleton: Skeleton) -> bool:
        """Keep an unloaded module as the next skeleton of its architecture (its tensors are stripped
        to the meta device, freeing their memory). False, and nothing kept, when the pool is full."""
        key = self.key(class_name, config)
        with self._lock:
            ready = self._slot(key)
            if len(ready) >= self._depth:
                return False
            skeleton.strip()
            done: Future[Skeleton] = Future()
            done.set_result(skeleton)
            ready.append(done)
            self.recycled += 1
            return True

    def take(self, class_name: str, config: dict[str, Any], *, path: str = "") -> Future[Skeleton]:
        """A skeleton: a ready one, else one being built in the background (diffusers classes)
        while the caller reads the weights, else (transformers classes) one built now."""
        with self._lock:
            ready = self._ready.get(self.key(class_name, config))
            fut = ready.pop(0) if ready else None
        if fut is not None:
            return fut
        if class_name in TEXT_ENCODER_CLASSES:
            done: Future[Skeleton] = Future()
            try:
                done.set_result(_prepared(class_name, config, path=path))
            except InvalidModelFile as exc:
                done.set_exception(exc)
            return done
        return self._pool.submit(_prepared, class_name, dict(config), path=path)


def _prepared(class_name: str, config: dict[str, Any], *, path: str = "") -> Skeleton:
    return Skeleton.prepare(skeleton(class_name, config, path=path))


def build_module(
    class_name: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
    *,
    path: str = "",
    module: torch.nn.Module | Skeleton | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> torch.nn.Module:
    """Adopt ``state`` as the tensors of a meta-device ``class_name`` (built here unless given).

    Keys and shapes are checked against the skeleton's expected state dict; each tensor becomes the
    parameter (frozen) or buffer it names, without ``load_state_dict``'s per-module machinery.
    ``shapes`` gives the logical shape of tensors stored packed (GGUF blocks are bytes).
    """
    shapes = shapes or {}
    if module is None:
        module = skeleton(class_name, config, path=path)
    skel = module if isinstance(module, Skeleton) else Skeleton.prepare(module)
    module, expected = skel.module, skel.expected
    if class_name in TEXT_ENCODER_CLASSES:
        state = rename_for_transformers(module, state, expected)
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise InvalidModelFile(
            f"{path}: {len(unexpected)} tensor(s) do not belong to {class_name}: {', '.join(unexpected[:5])}",
            path=path,
            unexpected=unexpected[:50],
        )
    mismatched = [
        f"{k} {shapes.get(k, tuple(v.shape))} vs expected {expected[k]}"
        for k, v in state.items()
        if shapes.get(k, tuple(v.shape)) != expected[k]
    ]
    if mismatched:
        raise InvalidModelFile(
            f"{path}: shapes do not match the {class_name} config: {'; '.join(mismatched[:5])}", path=path
        )
    owners = skel.owners
    for key, tensor in state.items():
        owner, attr, is_param = owners[key]
        if is_param:
            owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor
    missing = [k for k in expected if k not in state]
    if missing:
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()  # files often store a tied weight once (T5's shared embedding)
        missing = [k for k in missing if _tensor_of(owners[k]).is_meta]
    missing += [n for n, b in module.named_buffers() if b.is_meta and n not in expected]
    if missing:
        raise InvalidModelFile(
            f"{path}: {len(missing)} weight(s) of {class_name} are missing from the file: {', '.join(missing[:5])}",
            path=path,
            missing=missing[:50],
        )
    if any(b.device != device for b in module.buffers()):
        module.to(device)  # small buffers built on the CPU; parameters are already there
    return module


def _tensor_of(owner: tuple[torch.nn.Module, str, bool]) -> torch.Tensor:
    module, attr, is_param = owner
    found = module._parameters[attr] if is_param else module._buffers[attr]
    assert found is not None
    return found


def rename_for_transformers(
    module: torch.nn.Module, state: dict[str, torch.Tensor], expected: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Apply the key renamings transformers itself applies when loading (v5 moved some prefixes).

    Only renamings are applied; a checkpoint that needs tensor conversions is refused. Keys that
    are already the module's are returned as they are (a second call is free)."""
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
