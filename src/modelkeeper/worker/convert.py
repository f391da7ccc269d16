"""Key layouts of single files, and conversion to the layout the diffusers/transformers classes load.

Which layout a file uses, and where a component sits inside a full checkpoint, is found from
key names alone by the rules of ``LAYOUT_RULES`` (data: an anchor key suffix, the keys that must
stand beside it, the converter to use). Conversions reuse diffusers' own single-file converters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from modelkeeper.formats import llama_t5
from modelkeeper.formats.conventions import LDM_DENOISER_PREFIX
from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import BLOCK_SIZES, read_gguf_header
from modelkeeper.protocol.messages import KeyLayout, ModelKind
from modelkeeper.worker.weights import TensorEntry

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, str, dict[str, Any]], StateDict]

#: Keys some files carry that the current classes rebuild themselves (non-persistent buffers).
IGNORED_SUFFIXES = ("text_model.embeddings.position_ids", "logit_scale")


@dataclass(frozen=True)
class LayoutRule:
    """A component of ``kind`` in ``layout`` sits at prefix P when ``P + anchor`` and every
    ``P + also`` key exist. ``family`` names the converter; ``width_key`` (relative to P) gives the
    tensor whose last dimension is the component's width, used to pick among several candidates."""

    name: str
    kind: ModelKind
    layout: KeyLayout
    family: str
    anchor: str
    also: tuple[str, ...] = ()
    width_key: str | None = None


LAYOUT_RULES: tuple[LayoutRule, ...] = (
    LayoutRule("unet/original", ModelKind.UNET, KeyLayout.ORIGINAL, "ldm_unet", "input_blocks.0.0.weight",
               ("time_embed.0.weight", "out.2.weight")),
    LayoutRule("unet/diffusers", ModelKind.UNET, KeyLayout.DIFFUSERS, "plain", "time_embedding.linear_1.weight",
               ("conv_in.weight", "up_blocks.0.resnets.0.conv1.weight")),
    LayoutRule("vae/original", ModelKind.VAE, KeyLayout.ORIGINAL, "ldm_vae", "encoder.down.0.block.0.conv1.weight",
               ("decoder.conv_out.weight",)),
    LayoutRule("vae/diffusers", ModelKind.VAE, KeyLayout.DIFFUSERS, "plain",
               "encoder.down_blocks.0.resnets.0.conv1.weight", ("decoder.conv_out.weight",)),
    LayoutRule("controlnet/original", ModelKind.CONTROLNET, KeyLayout.ORIGINAL, "ldm_controlnet",
               "input_hint_block.0.weight", ("time_embed.0.weight",)),
    LayoutRule("controlnet/diffusers", ModelKind.CONTROLNET, KeyLayout.DIFFUSERS, "plain",
               "controlnet_cond_embedding.conv_in.weight", ("time_embedding.linear_1.weight",)),
    LayoutRule("clip/transformers", ModelKind.TEXT_ENCODER, KeyLayout.DIFFUSERS, "plain",
               "text_model.embeddings.token_embedding.weight", (),
               "text_model.embeddings.token_embedding.weight"),
    LayoutRule("clip/openclip", ModelKind.TEXT_ENCODER, KeyLayout.ORIGINAL, "openclip",
               "transformer.resblocks.0.attn.in_proj_weight", ("token_embedding.weight",), "token_embedding.weight"),
    LayoutRule("t5/transformers", ModelKind.TEXT_ENCODER, KeyLayout.DIFFUSERS, "plain",
               "encoder.block.0.layer.0.SelfAttention.q.weight", (), "encoder.block.0.layer.0.SelfAttention.q.weight"),
    LayoutRule("t5/gguf", ModelKind.TEXT_ENCODER, KeyLayout.ORIGINAL, "llama_t5", llama_t5.ANCHOR,
               ("token_embd.weight",), llama_t5.WIDTH_KEY),
    LayoutRule("flux/original", ModelKind.TRANSFORMER, KeyLayout.ORIGINAL, "flux", "double_blocks.0.img_attn.qkv.weight"),
    LayoutRule("sd3/original", ModelKind.TRANSFORMER, KeyLayout.ORIGINAL, "sd3",
               "joint_blocks.0.x_block.attn.qkv.weight"),
    LayoutRule("transformer/diffusers", ModelKind.TRANSFORMER, KeyLayout.DIFFUSERS, "plain",
               "transformer_blocks.0.attn.to_q.weight", ("proj_out.weight",)),
)  # fmt: skip


@dataclass(frozen=True)
class ComponentPlan:
    rule: LayoutRule
    prefix: str
    keys: list[str]

    @property
    def layout(self) -> KeyLayout:
        return _layout_of(self.rule, self.prefix)

    def shapes(self, tensors: dict[str, TensorEntry]) -> dict[str, tuple[int, ...]]:
        """The shapes of the component's tensors, keyed without the prefix."""
        return {k[len(self.prefix) :]: tensors[k].shape for k in self.keys}


def _layout_of(rule: LayoutRule, prefix: str) -> KeyLayout:
    """Text encoders keep transformers' key names inside original checkpoints, under a prefix
    (``cond_stage_model.transformer.``): there the prefix is what makes the layout original."""
    if rule.kind is ModelKind.TEXT_ENCODER and rule.family == "plain" and prefix:
        return KeyLayout.ORIGINAL
    return rule.layout


def _width(config: dict[str, Any]) -> int | None:
    for field in ("hidden_size", "d_model"):
        value = config.get(field)
        if isinstance(value, int):
            return value
    return None


def plan_component(
    kind: ModelKind,
    tensors: dict[str, TensorEntry],
    config: dict[str, Any],
    *,
    declared: KeyLayout = KeyLayout.AUTO,
    path: str = "",
) -> ComponentPlan:
    """Find where the ``kind`` component sits in ``tensors`` and in which layout."""
    candidates: list[tuple[LayoutRule, str]] = []
    for rule in LAYOUT_RULES:
        if rule.kind is not kind:
            continue
        for key in tensors:
            if key.endswith(rule.anchor):
                prefix = key[: len(key) - len(rule.anchor)]
                if declared is not KeyLayout.AUTO and _layout_of(rule, prefix) is not declared:
                    continue
                if all(prefix + also in tensors for also in rule.also):
                    candidates.append((rule, prefix))
    if kind is ModelKind.TEXT_ENCODER:
        candidates = _pick_text_encoder(candidates, tensors, config)
    if not candidates:
        looked = ", ".join(r.name for r in LAYOUT_RULES if r.kind is kind)
        raise InvalidModelFile(
            f"{path}: no {kind.value} weights found (layouts tried: {looked}; declared layout {declared.value})",
            path=path,
        )
    # Prefer the shortest prefix (a bare component over one nested in something else).
    rule, prefix = min(candidates, key=lambda c: len(c[1]))
    keys = [k for k in tensors if k.startswith(prefix) and not k.endswith(IGNORED_SUFFIXES)]
    return ComponentPlan(rule, prefix, keys)


def gguf_t5_config(
    kind: ModelKind, tensors: dict[str, TensorEntry], path: Path, config: dict[str, Any]
) -> dict[str, Any]:
    """``config`` fitted to a T5 encoder in llama.cpp's names (city96's T5 GGUFs, read from the file
    or from its RAM-cache segment): the tensors' logical shapes and, from the GGUF file itself, its
    ``t5encoder.*`` metadata decide the architecture (``formats.llama_t5.t5_config``), so a known
    T5-XXL config, or any T5 config given, builds the model the file holds. Any other component's
    config is returned as it is."""
    if kind is not ModelKind.TEXT_ENCODER or not llama_t5.is_llama_t5(tensors):
        return config
    shapes = {key: _logical_shape(e) for key, e in tensors.items()}
    metadata = read_gguf_header(path).metadata if path.suffix.lower() == ".gguf" else {}
    return llama_t5.t5_config(shapes, metadata, config)


def _logical_shape(entry: TensorEntry) -> tuple[int, ...]:
    """The shape a tensor stands for: a quantized GGUF tensor is stored as rows of blocks (bytes)."""
    if entry.quant is None or entry.quant not in BLOCK_SIZES or not entry.shape:
        return entry.shape
    block, size = BLOCK_SIZES[entry.quant]
    return (*entry.shape[:-1], entry.shape[-1] // size * block)


def _pick_text_encoder(
    candidates: list[tuple[LayoutRule, str]], tensors: dict[str, TensorEntry], config: dict[str, Any]
) -> list[tuple[LayoutRule, str]]:
    """The candidates of the config's encoder family and width; when none has the width and one is of
    the family, that one (a shrunk encoder: its config is fitted to its shapes afterwards)."""
    if "model_type" in config:
        is_t5 = config.get("model_type") == "t5"
        wanted = [(r, p) for r, p in candidates if r.name.startswith("t5") == is_t5]
    else:
        wanted = candidates
    width = _width(config)
    if width is None:
        return wanted
    fitting = [(r, p) for r, p in wanted if r.width_key and tensors[p + r.width_key].shape[-1] == width]
    return fitting or (wanted if len(wanted) == 1 else [])


def has_text_projection(plan: ComponentPlan) -> bool:
    return any(
        k == plan.prefix + "text_projection.weight" or k == plan.prefix + "text_projection" for k in plan.keys
    )


def to_loadable(plan: ComponentPlan, state: StateDict, config: dict[str, Any]) -> StateDict:
    """Convert the component's tensors (keys with the plan's prefix) to the class's own key names."""
    converter = CONVERTERS[plan.rule.family]
    with _PiecesNotCopies():
        return converter(state, plan.prefix, config)


class _PiecesNotCopies(torch.overrides.TorchFunctionMode):
    """diffusers' converters put every piece of a split tensor through ``torch.cat([piece])`` (each
    q, k, v weight of a Flux file): a copy of a third of the model, while the file's buffer, which
    the other tensors still view, stays alive. Here ``cat`` of one tensor is that tensor, a view."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat and args and isinstance(args[0], list | tuple) and len(args[0]) == 1:
            return args[0][0]
        return func(*args, **kwargs)


def _strip(state: StateDict, prefix: str) -> StateDict:
    if not prefix:
        return state
    return {k[len(prefix) :]: v for k, v in state.items()}


def _ldm_unet(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    renamed = {LDM_DENOISER_PREFIX + k: v for k, v in _strip(state, prefix).items()}
    return dict(convert_ldm_unet_checkpoint(renamed, config))


def _ldm_vae(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return dict(convert_ldm_vae_checkpoint(_strip(state, prefix), config))


def _ldm_controlnet(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    return dict(convert_controlnet_checkpoint(_strip(state, prefix), config))


def _openclip(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    holder = SimpleNamespace(config=SimpleNamespace(hidden_size=config.get("hidden_size")))
    return dict(convert_open_clip_checkpoint(holder, state, prefix=prefix))


def _flux(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return dict(convert_flux_transformer_checkpoint_to_diffusers(_strip(state, prefix)))


def _sd3(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return dict(convert_sd3_transformer_checkpoint_to_diffusers(_strip(state, prefix)))


def _llama_t5(state: StateDict, prefix: str, config: dict[str, Any]) -> StateDict:
    """llama.cpp's T5 encoder names to transformers' (the tensors, GGUF blocks included, unchanged)."""
    state = _strip(state, prefix)
    names = llama_t5.transformers_names(state)
    return {names[k]: v for k, v in state.items() if k in names}


CONVERTERS: dict[str, Converter] = {
    "plain": lambda state, prefix, config: _strip(state, prefix),
    "ldm_unet": _ldm_unet,
    "ldm_vae": _ldm_vae,
    "ldm_controlnet": _ldm_controlnet,
    "openclip": _openclip,
    "flux": _flux,
    "sd3": _sd3,
    "llama_t5": _llama_t5,
}
