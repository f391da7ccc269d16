"""Build a ``torch.nn.Module`` from a config and a state dict with no random init and no second copy.

The module is constructed with its parameters on the meta device (``accelerate.init_empty_weights``),
then given the loaded tensors with ``load_state_dict(assign=True)``: the tensors read from the
file *are* the parameters. Only classes on the allowlist below can be built.
"""

from __future__ import annotations

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

        cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
        model_type = "clip_text_model" if class_name.startswith("CLIP") else "t5"
        cfg_dict.pop("model_type", None)
        hf_config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        module: torch.nn.Module = getattr(transformers, class_name)(hf_config)
        return module
    import diffusers

    cls = getattr(diffusers, class_name)
    return cls.from_config(config)  # type: ignore[no-any-return]


def build_module(
    class_name: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    device: torch.device,
    *,
    path: str = "",
) -> torch.nn.Module:
    """Construct ``class_name`` on the meta device and adopt ``state`` as its tensors."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            module = _construct(class_name, config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidModelFile(f"{path}: config does not build a {class_name}: {exc}", path=path) from None
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
    module.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    tie = getattr(module, "tie_weights", None)
    if missing and callable(tie):
        tie()  # files often store a tied weight once (T5's shared embedding)
        missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise InvalidModelFile(
            f"{path}: {len(missing)} weight(s) of {class_name} are missing from the file: {', '.join(missing[:5])}",
            path=path,
            missing=missing[:50],
        )
    module.to(device)  # buffers were built on the CPU; parameters are already there
    module.eval()
    module.requires_grad_(False)
    return module


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
