"""LoRAs patched into live modules: fused (no cost per forward pass), exact and reversible.

For every weight ``W`` a LoRA touches, the original ``W0`` is kept in a backup when it is first
patched (on the device, or in pinned host memory when the device is short), and the weight is
always re-derived from it::

    W = W0 + sum_i strength_i * scale_i * delta_i      (i: the LoRAs on W, in load order)

so changing a strength rewrites only the touched weights from ``W0`` (no file read, no reload of
the base model), and removing the last LoRA of a weight copies ``W0`` back: bitwise the original.
Each LoRA's factors are prepared once, on the device and in the weight's dtype, when it is loaded:
``up @ down`` for LoRA / LoCon (and LoHa, whose Hadamard product is rewritten as one low-rank
product of rank r1*r2 when that is smaller than the weight), the two Kronecker factors for LoKr.

Formats (key names: the first half of this module): kohya / sd-scripts
(``lora_unet_*``, ``lora_te[12]_*``: ``lora_down``/``lora_up``/``alpha``, conv LoCon), LyCORIS LoHa
(``hada_w*``) and LoKr (``lokr_w*``), full diffs (``diff``), PEFT / diffusers (``unet.*.lora_A``, the
scale from the file's ``lora_adapter_metadata``) and old diffusers (``to_q_lora.down``), on SD1/SD2,
SDXL (sd-scripts' SGM names) and Flux (sd-scripts / BFL names) models and their text encoders.
Refused with a clear error and nothing changed: DoRA, Tucker-decomposed LyCORIS, a LoRA whose
layers do not fit (another base) or whose keys match nothing.

Proposed protocol (the handlers resolve model names to modules and call the manager):

- ``model.load_lora`` data ``{name, path, targets: {unet|transformer|text_encoder|text_encoder_2:
  <loaded model name>}, strength: 1.0, role_strength?: {role: float}, strict: false,
  min_match: 0.5}``; result :meth:`LoraReport.as_dict` ``{name, source, format, strength,
  role_strength, roles: {role: {layers, keys}}, matched_keys, unmatched_keys, unmatched,
  skipped_roles, params_patched, factor_bytes, backup_bytes, backup_place, read_seconds,
  prepare_seconds, apply_seconds, seconds}``.
- ``model.set_lora_strength`` data ``{name, strength, role_strength?}``; result
  ``{name, strength, previous, role_strength, params_patched, seconds}``.
- ``model.unload_lora`` data ``{name}``; result ``{name, params_restored, params_rederived,
  freed_bytes, seconds}``. ``model.get_model_info`` may list :meth:`LoraManager.loaded`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from modelkeeper.formats.conventions import SAFETENSORS_SUFFIXES
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsupportedFormat
from modelkeeper.protocol.errors import ErrorCode
from modelkeeper.worker.errors import AlreadyLoaded, InvalidRequest, NotLoaded, WorkerError

StateDict = dict[str, torch.Tensor]
Algo = Literal["lora", "loha", "lokr", "full"]
BackupPlace = Literal["auto", "device", "cpu"]
GiB = 1024**3
#: Roles a LoRA file names (by key prefix) and a caller maps to modules; ``unet`` and
#: ``transformer`` both name the denoiser.
ROLES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER = ("unet", "transformer")
PATCHABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class LoraIncompatible(WorkerError):
    """The LoRA does not fit the modules it was given: none of its keys names a layer of them, or
    the layers it names have other shapes (a LoRA made for another base, an SDXL LoRA on an SD1
    UNet). Nothing was changed. ``details`` carries ``mismatched`` / ``unmatched`` examples."""

    code = ErrorCode.INVALID_REQUEST


def read_lora_file(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """A LoRA file's tensors (on the CPU) and its safetensors metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFound(f"{path}: no such LoRA file", path=str(path))
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UnsupportedFormat(
            f"{path}: LoRAs are read from .safetensors files (convert pickle files first)", path=str(path)
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path}: not a readable safetensors file: {exc}", path=str(path)) from None
    return tensors, metadata


# ============================================================================ key names and factors


@dataclass
class Factors:
    """A layer's delta factors as the file stores them. ``tensors`` slots: ``up``/``down`` (LoRA),
    ``w1a w1b w2a w2b`` (LoHa), ``k1 k1a k1b k2 k2a k2b`` (LoKr), ``diff``; ``shape`` is the delta's
    natural shape ``(out, in, *kernel)``."""

    algo: Algo
    tensors: dict[str, torch.Tensor]
    scale: float
    shape: tuple[int, ...]


@dataclass(eq=False)
class Layer:
    """One layer of a LoRA file: the role its prefix names, its module name as spelled there."""

    role: str
    name: str
    keys: list[str]
    factors: Factors


@dataclass(frozen=True, eq=False)
class Match:
    """``layer`` (rows ``src`` of its delta) patches rows ``dst`` of ``param`` of target ``role``."""

    layer: Layer
    role: str
    module: str
    param: torch.Tensor
    src: slice | None = None
    dst: slice | None = None


KOHYA_PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)
DOTTED_PREFIXES = (
    ("base_model.model.", ""),
    ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("text_encoder.", "text_encoder"),
    ("diffusion_model.", "unet"),
)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "alpha": ("", "alpha"),
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "lokr_w1": ("lokr", "k1"),
    "lokr_w1_a": ("lokr", "k1a"),
    "lokr_w1_b": ("lokr", "k1b"),
    "lokr_w2": ("lokr", "k2"),
    "lokr_w2_a": ("lokr", "k2a"),
    "lokr_w2_b": ("lokr", "k2b"),
    "diff": ("full", "diff"),
}
UNSUPPORTED = {
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_mid.weight": "LoCon with a Tucker core",
    "hada_t1": "LoHa with Tucker cores",
    "hada_t2": "LoHa with Tucker cores",
    "lokr_t2": "LoKr with a Tucker core",
    "lora_B.bias": "LoRA with biases",
}
_REQUIRED = {
    "lora": ({"up", "down"},),
    "loha": ({"w1a", "w1b", "w2a", "w2b"},),
    "full": ({"diff"},),
    "lokr": ({"k1", "k2"}, {"k1a", "k1b", "k2"}, {"k1", "k2a", "k2b"}, {"k1a", "k1b", "k2a", "k2b"}),
}
_OLD_DIFFUSERS = ("_lora.down.", "_lora.up.", ".lora.down.", ".lora.up.", "lora_linear_layer.", ".processor.")
_SGM_RENAMES = (
    (r"^input_blocks_0_0$", "conv_in"),
    (r"^out_2$", "conv_out"),
    (r"^input_blocks_", "down_blocks_"),
    (r"^middle_block_", "mid_block_"),
    (r"^output_blocks_", "up_blocks_"),
    (r"^time_embed_0$", "time_embedding_linear_1"),
    (r"^time_embed_2$", "time_embedding_linear_2"),
    (r"^label_emb_0_0$", "add_embedding_linear_1"),
    (r"^label_emb_0_2$", "add_embedding_linear_2"),
    (r"_in_layers_2$", "_conv1"),
    (r"_out_layers_3$", "_conv2"),
    (r"_emb_layers_1$", "_time_emb_proj"),
    (r"_skip_connection$", "_conv_shortcut"),
    (r"_op$", "_conv"),
)
_DB, _SB = "transformer_blocks.{}.", "single_transformer_blocks.{}."
#: sd-scripts / BFL Flux layer names -> diffusers FluxTransformer2DModel modules (fused ones split by rows).
FLUX_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"double_blocks_(\d+)_img_attn_qkv", (_DB + "attn.to_q", _DB + "attn.to_k", _DB + "attn.to_v")),
    (r"double_blocks_(\d+)_txt_attn_qkv", (_DB + "attn.add_q_proj", _DB + "attn.add_k_proj", _DB + "attn.add_v_proj")),
    (r"double_blocks_(\d+)_img_attn_proj", (_DB + "attn.to_out.0",)),
    (r"double_blocks_(\d+)_txt_attn_proj", (_DB + "attn.to_add_out",)),
    (r"double_blocks_(\d+)_img_mlp_0", (_DB + "ff.net.0.proj",)), (r"double_blocks_(\d+)_img_mlp_2", (_DB + "ff.net.2",)),
    (r"double_blocks_(\d+)_txt_mlp_0", (_DB + "ff_context.net.0.proj",)),
    (r"double_blocks_(\d+)_txt_mlp_2", (_DB + "ff_context.net.2",)),
    (r"double_blocks_(\d+)_img_mod_lin", (_DB + "norm1.linear",)),
    (r"double_blocks_(\d+)_txt_mod_lin", (_DB + "norm1_context.linear",)),
    (r"single_blocks_(\d+)_linear1", (_SB + "attn.to_q", _SB + "attn.to_k", _SB + "attn.to_v", _SB + "proj_mlp")),
    (r"single_blocks_(\d+)_linear2", (_SB + "proj_out",)), (r"single_blocks_(\d+)_modulation_lin", (_SB + "norm.linear",)),
    (r"img_in", ("x_embedder",)), (r"txt_in", ("context_embedder",)), (r"final_layer_linear", ("proj_out",)),
    (r"time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer_adaLN_modulation_1", ("norm_out.linear", "swap")),  # BFL (shift, scale) -> (scale, shift)
)  # fmt: skip


def parse_lora(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], label: str
) -> tuple[str, list[Layer], list[str]]:
    """The layers of a LoRA state dict: ``(format, layers, ignored keys)``. Raises UnsupportedFormat
    for DoRA / Tucker files or when no key is a LoRA key, InvalidModelFile for incomplete layers."""
    for key in state:
        for suffix, what in UNSUPPORTED.items():
            if key.endswith(suffix):
                raise UnsupportedFormat(f"{label}: {what} is not supported (key {key!r})", path=label)
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    ignored: list[str] = []
    styles: set[str] = set()
    for role, name_key, original, tensor in _split_roles(state, styles):
        name, slot = _split_suffix(name_key)
        if name is None:
            ignored.append(original)
            continue
        groups.setdefault((role, name), {})[slot] = (original, tensor)
    for group in [g for g, slots in groups.items() if set(slots) == {"alpha"}]:  # an alpha with no weights
        ignored.append(groups.pop(group)["alpha"][0])
    if not groups:
        raise UnsupportedFormat(
            f"{label}: no LoRA keys found (e.g. {next(iter(state), 'none')!r})", path=label
        )
    peft = _peft_configs(metadata)
    layers = [_layer(role, name, slots, peft, label) for (role, name), slots in groups.items()]
    algos = sorted({layer.factors.algo for layer in layers})
    kinds = {"lora": "+".join(sorted(styles)), "loha": "loha", "lokr": "lokr", "full": "full"}
    return "+".join(kinds[a] for a in algos), layers, ignored


def _split_roles(
    state: Mapping[str, torch.Tensor], styles: set[str]
) -> Iterator[tuple[str, str, str, torch.Tensor]]:
    """(role, key without role prefix, original key, tensor); old diffusers names converted with
    diffusers' own tables."""
    from diffusers.utils import state_dict_utils as sdu

    for key, tensor in state.items():
        role = next((r for p, r in KOHYA_PREFIXES if key.startswith(p)), None)
        if role is not None:
            styles.add("kohya")
            prefix = next(p for p, _ in KOHYA_PREFIXES if key.startswith(p))
            yield role, key[len(prefix) :], key, tensor
            continue
        rest, role = key, ""
        for prefix, named in DOTTED_PREFIXES:
            if rest.startswith(prefix):
                rest, role = rest[len(prefix) :], named or role
        rest = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", rest)  # peft adapter names
        if any(marker in rest for marker in _OLD_DIFFUSERS):
            styles.add("diffusers-old")
            table = (
                sdu.UNET_TO_DIFFUSERS
                if role in DENOISER
                else {**sdu.DIFFUSERS_OLD_TO_PEFT, **sdu.DIFFUSERS_TO_PEFT}
            )
            (rest,) = sdu.convert_state_dict({rest: tensor}, table)
            rest = re.sub(r"\.(lora_[AB])$", r".\1.weight", rest)
        else:
            styles.add("peft")
        yield role, rest, key, tensor


def _split_suffix(key: str) -> tuple[str | None, str]:
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None, ""


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """PEFT ``LoraConfig`` fields per role from diffusers' ``lora_adapter_metadata`` entry."""
    try:
        data = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items() if isinstance(data, dict) else ():
        role, dot, name = key.partition(".")
        if dot and role in ROLES:
            configs.setdefault(role, {})[name] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _layer(
    role: str,
    name: str,
    slots: dict[str, tuple[str, torch.Tensor]],
    peft: dict[str, dict[str, Any]],
    label: str,
) -> Layer:
    keys = [original for original, _ in slots.values()]
    families = {SUFFIXES[s][0] for s in slots} - {""}
    t = {SUFFIXES[s][1]: tensor for s, (_, tensor) in slots.items() if s != "alpha"}
    algo = cast(Algo, next(iter(families))) if len(families) == 1 else None
    if algo is None or not any(req <= set(t) for req in _REQUIRED[algo]):
        raise InvalidModelFile(
            f"{label}: layer {name!r} has an incomplete or mixed set of keys: {sorted(slots)}", path=label
        )
    alpha = float(slots["alpha"][1].item()) if "alpha" in slots else None
    if algo == "lora":
        up, down = t["up"], t["down"]
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            raise InvalidModelFile(
                f"{label}: layer {name!r}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not multiply",
                path=label,
            )
        rank, shape = down.shape[0], (up.shape[0], *down.shape[1:])
        config = peft.get(role) or peft.get("", {})
        scale = alpha / rank if alpha is not None else _peft_scale(config, name, rank)
    elif algo == "loha":
        rank, shape = t["w1b"].shape[0], (t["w1a"].shape[0], *t["w1b"].shape[1:])
        scale = alpha / rank if alpha is not None else 1.0
    elif algo == "lokr":
        w1 = tuple(t["k1"].shape) if "k1" in t else (t["k1a"].shape[0], t["k1b"].shape[1])
        w2 = tuple(t["k2"].shape) if "k2" in t else (t["k2a"].shape[0], *t["k2b"].shape[1:])
        dim = t["k2b"].shape[0] if "k2b" in t else (t["k1b"].shape[0] if "k1b" in t else None)
        scale = alpha / dim if alpha is not None and dim else 1.0
        shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    else:
        scale, shape = 1.0, tuple(t["diff"].shape)
    return Layer(role, name, keys, Factors(algo, t, float(scale), tuple(int(s) for s in shape)))


def _peft_scale(config: dict[str, Any], name: str, rank: int) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); alpha_pattern entries override by module name."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


class _Index:
    """The patchable layers of a target module by dotted and by flattened (kohya) name."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.dotted: dict[str, str] = {}
        self.flat: dict[str, str] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, PATCHABLE):
                other = (
                    name.removeprefix("text_model.")
                    if name.startswith("text_model.")
                    else "text_model." + name
                )
                for alias in (name, other):
                    self.dotted.setdefault(alias, name)
                    self.flat.setdefault(alias.replace(".", "_"), name)
        config = getattr(module, "config", None)
        self.unet_config = config if hasattr(config, "layers_per_block") else None
        self.flux = hasattr(module, "single_transformer_blocks")

    def weight(self, name: str) -> torch.Tensor:
        weight = self.module.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def find(self, name: str) -> str | None:
        return self.dotted.get(name) or self.flat.get(name.replace(".", "_"))

    def locate(self, name: str) -> list[tuple[str, slice | None, slice | None]]:
        """Target modules of a source layer, with row slices for fused (split) layers."""
        found = self.find(name)
        if found:
            return [(found, None, None)]
        flat = name.replace(".", "_")
        if self.unet_config is not None:
            found = self.find(_sgm_to_diffusers(flat, self.unet_config))
            return [(found, None, None)] if found else []
        if self.flux:
            for pattern, modules in FLUX_RULES:
                hit = re.fullmatch(pattern, flat)
                if hit:
                    return self._split([m.format(*hit.groups()) for m in modules])
        return []

    def _split(self, modules: list[str]) -> list[tuple[str, slice | None, slice | None]]:
        names = [self.find(m) for m in modules if m != "swap"]
        if any(n is None for n in names):
            return []
        rows = [self.weight(str(n)).shape[0] for n in names]
        if modules[-1] == "swap":
            half = rows[0] // 2
            return [
                (str(names[0]), slice(half, 2 * half), slice(0, half)),
                (str(names[0]), slice(0, half), slice(half, 2 * half)),
            ]
        if len(names) == 1:
            return [(str(names[0]), None, None)]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        return [(str(n), slice(s, s + r), None) for n, s, r in zip(names, starts, rows, strict=True)]


def _sgm_to_diffusers(flat: str, config: Any) -> str:
    """sd-scripts' SGM UNet names (SDXL) -> diffusers names: diffusers' block mapping, then the
    layer renames inside blocks."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    name = flat
    if re.match(r"(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_", flat) and not (
        flat.startswith("input_blocks_0_0")
    ):
        try:
            (key,) = _maybe_map_sgm_blocks_to_diffusers({f"lora_unet_{flat}.w": 0}, config)
        except (ValueError, IndexError, KeyError):
            return flat
        name = key[len("lora_unet_") : -len(".w")]
    for pattern, replacement in _SGM_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _target_role(role: str, targets: Mapping[str, torch.nn.Module]) -> str | None:
    if role in targets:
        return role
    if role in DENOISER or (role == "" and len(targets) > 1):
        return next((r for r in DENOISER if r in targets), None)
    return next(iter(targets)) if role == "" else None


def resolve(
    layers: list[Layer], targets: Mapping[str, torch.nn.Module]
) -> tuple[list[Match], list[str], set[str], list[str]]:
    """Match layers to the targets' weights: ``(matches, unmatched keys, roles without a target,
    shape mismatches)``."""
    indexes: dict[str, _Index] = {}
    matches: list[Match] = []
    unmatched: list[str] = []
    skipped: set[str] = set()
    mismatched: list[str] = []
    for layer in layers:
        role = _target_role(layer.role, targets)
        if role is None:
            skipped.add(layer.role or "(no prefix)")
            continue
        index = indexes.get(role) or indexes.setdefault(role, _Index(targets[role]))
        located = index.locate(layer.name)
        if not located:
            unmatched.extend(layer.keys)
        for module, src, dst in located:
            param = index.weight(module)
            problem = _misfit(layer.factors.shape, param, src, dst)
            if problem:
                mismatched.append(f"{layer.keys[0]} -> {role}.{module}: {problem}")
            else:
                matches.append(Match(layer, role, module, param, src, dst))
    return matches, unmatched, skipped, mismatched


def _misfit(shape: tuple[int, ...], param: torch.Tensor, src: slice | None, dst: slice | None) -> str | None:
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weights of dtype {param.dtype} cannot be patched"
    rows = (src.stop - src.start) if src else shape[0]
    target_rows = (dst.stop - dst.start) if dst else param.shape[0]
    cols, target_cols = math.prod(shape[1:]), math.prod(param.shape[1:])
    kernel_differs = len(shape) > 2 and param.dim() > 2 and shape[2:] != tuple(param.shape[2:])
    if rows != target_rows or cols != target_cols or kernel_differs or (src and src.stop > shape[0]):
        return f"delta {shape} vs weight {tuple(param.shape)}"
    return None


# ============================================================================ patching


class Delta:
    """One layer's weight delta, prepared on the device in the weight's dtype: ``up`` [rows, r] and
    ``down`` [r, cols] for LoRA (and LoHa, rewritten as one product of rank r1*r2 when that is
    smaller than the weight), the two Kronecker factors for LoKr, or a dense matrix."""

    def __init__(self, factors: Factors, device: torch.device, dtype: torch.dtype) -> None:
        self.scale, self.shape = factors.scale, factors.shape
        self.up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        self.kron: tuple[torch.Tensor, torch.Tensor] | None = None
        rows = self.shape[0]
        if factors.algo == "lora":
            up, down = factors.tensors["up"], factors.tensors["down"]
            self.up = up.reshape(rows, -1).to(device=device, dtype=dtype).contiguous()
            self.down = down.reshape(down.shape[0], -1).to(device=device, dtype=dtype).contiguous()
            return
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in factors.tensors.items()}
        if factors.algo == "loha":
            a1, b1, a2, b2 = (t[k].reshape(t[k].shape[0], -1) for k in ("w1a", "w1b", "w2a", "w2b"))
            r1, r2, cols = a1.shape[1], a2.shape[1], b1.shape[1]
            if r1 * r2 * (rows + cols) < rows * cols:  # (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2), Khatri-Rao
                self.up = (a1[:, :, None] * a2[:, None, :]).reshape(rows, r1 * r2).to(dtype)
                self.down = (b1[:, None, :] * b2[None, :, :]).reshape(r1 * r2, cols).to(dtype)
            else:
                self.dense = ((a1 @ b1) * (a2 @ b2)).to(dtype)
        elif factors.algo == "lokr":
            w1 = t["k1"] if "k1" in t else t["k1a"] @ t["k1b"]
            w2 = t["k2"] if "k2" in t else (t["k2a"] @ t["k2b"].flatten(1)).reshape(-1, *t["k2b"].shape[1:])
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
            self.kron = (w1.to(dtype), w2.to(dtype))
        else:
            self.dense = t["diff"].reshape(rows, -1).to(dtype)

    @property
    def nbytes(self) -> int:
        parts = [self.up, self.down, self.dense, *(self.kron or ())]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def add_to(self, out: torch.Tensor, alpha: float, src: slice | None) -> None:
        """``out += alpha * delta[src]``, ``out`` a [rows, cols] view of the weight."""
        if (
            self.up is not None and self.down is not None
        ):  # the casts do nothing unless the model's dtype changed
            up = self.up if src is None else self.up[src]
            out.addmm_(up.to(out.dtype), self.down.to(out.dtype), alpha=alpha)
            return
        dense = torch.kron(*self.kron).reshape(self.shape[0], -1) if self.kron else self.dense
        assert dense is not None
        out.add_((dense if src is None else dense[src]).to(out.dtype), alpha=alpha)


@dataclass(eq=False)
class _Term:
    lora: _Lora
    role: str
    delta: Delta
    src: slice | None
    dst: slice | None


@dataclass(eq=False)
class _Patched:
    """A patched weight: the parameter, its original, and the LoRA terms on it in load order."""

    param: torch.Tensor
    owner: int  # id() of the target module it belongs to
    backup: torch.Tensor
    terms: list[_Term] = field(default_factory=list)
    _views: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (data_ptr, out, base) as matrices

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and its original as [rows, cols] matrices on the weight's device, cached
        while the weight keeps its storage (``module.to`` gives it a new one). A weight that is not
        contiguous (channels_last) is computed into a contiguous scratch matrix."""
        param = self.param
        if self._views is None or self._views[0] != param.data_ptr() or not param.is_contiguous():
            work = (
                param
                if param.is_contiguous()
                else torch.empty_like(param, memory_format=torch.contiguous_format)
            )
            out = work.view(param.shape[0], -1)
            base = self.backup.to(device=param.device, dtype=param.dtype, non_blocking=True).view(out.shape)
            self._views = (param.data_ptr() if work is param else -1, out, base)
        return self._views[1], self._views[2]


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
        self._patched: dict[int, _Patched] = {}
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
            backups = [(s.backup.numel() * s.backup.element_size(), s.backup.device == s.param.device)
                       for s in self._patched.values()]  # fmt: skip
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
    ) -> LoraReport:
        """Read ``source`` (a file, or a state dict with ``metadata``), match its layers to the
        ``targets`` (role -> module: ``unet`` or ``transformer``, ``text_encoder``,
        ``text_encoder_2``) and patch them with ``strength`` (``role_strength`` overrides per role).

        Everything is checked before any weight changes: an unreadable or unsupported file, layers
        whose shapes do not fit (another base), or fewer than ``min_match`` of the keys for the roles
        given matching a layer, leave every module as it was; with ``strict``, so does any unmatched
        key. ``check`` is called between stages (cancellation)."""
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
        _refuse_unfit(label, layers, matches, unmatched, mismatched, targets, 1.0 if strict else min_match)
        _call(check)
        deltas: dict[int, Delta] = {}
        for match in matches:
            if id(match.layer) not in deltas:
                deltas[id(match.layer)] = Delta(match.layer.factors, match.param.device, match.param.dtype)
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
            self._rederive(self._patched[key])
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
                self._rederive(state)
                rederived += 1
            else:
                with torch.no_grad():
                    state.param.copy_(state.backup)
                freed += state.backup.numel() * state.backup.element_size()
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
                del self._patched[key]
            for lora_name in touched:
                lora = self._loras[lora_name]
                lora.params = [k for k in lora.params if k in self._patched]
                if not lora.params:
                    del self._loras[lora_name]
        return sorted(touched)

    def _get(self, name: str) -> _Lora:
        with self._lock:
            lora = self._loras.get(name)
        if lora is None:
            raise NotLoaded(
                f"data.name: no LoRA named {name!r} is applied (applied: {self.names() or 'none'})"
            )
        return lora

    def _on_device(self, params: list[torch.Tensor]) -> bool:
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
        fresh = list({id(m.param): m.param for m in matches if id(m.param) not in self._patched}.values())
        on_device = self._on_device(fresh)
        created: list[int] = []
        try:
            for match in matches:
                key = id(match.param)
                if key not in self._patched:
                    state = _Patched(match.param, id(targets[match.role]), _backup(match.param, on_device))
                    with self._lock:
                        self._patched[key] = state
                    created.append(key)
                term = _Term(lora, match.role, deltas[id(match.layer)], match.src, match.dst)
                self._patched[key].terms.append(term)
                if key not in lora.params:
                    lora.params.append(key)
            for key in lora.params:
                self._rederive(self._patched[key])
        except BaseException:
            for key in lora.params:
                state = self._patched[key]
                state.terms = [t for t in state.terms if t.lora is not lora]
                self._rederive(state)
            with self._lock:
                for key in created:
                    del self._patched[key]
            raise
        need = sum(p.numel() * p.element_size() for p in fresh)
        return need, ("none" if not fresh else "device" if on_device else "cpu")

    @staticmethod
    def _rederive(state: _Patched) -> None:
        """``W = W0 + sum(strength * scale * delta)`` for one weight, from its original."""
        live = [(t, a) for t in state.terms if (a := t.lora.alpha(t)) != 0.0]
        with torch.no_grad():
            out, base = state.views()
            only = live[0][0].delta if len(live) == 1 and live[0][0].src is live[0][0].dst is None else None
            if only and only.up is not None and only.down is not None and only.up.dtype == out.dtype:
                torch.addmm(base, only.up, only.down, alpha=live[0][1], out=out)  # one kernel, one rounding
            else:
                out.copy_(base)
                for term, alpha in live:
                    term.delta.add_to(out if term.dst is None else out[term.dst], alpha, term.src)
            if out.data_ptr() != state.param.data_ptr():
                state.param.copy_(out.view(state.param.shape))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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


def _refuse_unfit(
    label: str,
    layers: list[Layer],
    matches: list[Match],
    unmatched: list[str],
    mismatched: list[str],
    targets: Mapping[str, torch.nn.Module],
    min_match: float,
) -> None:
    given = ", ".join(f"{role}={type(module).__name__}" for role, module in targets.items())
    if mismatched:
        raise LoraIncompatible(
            f"{label}: {len(mismatched)} layer(s) do not fit the modules given ({given}); the LoRA is for "
            f"another base model: {'; '.join(mismatched[:3])}",
            mismatched=mismatched[:20],
        )
    if not matches:
        roles = ", ".join(sorted({layer.role or "(no prefix)" for layer in layers}))
        example = ", ".join(unmatched[:3]) or layers[0].keys[0]
        raise LoraIncompatible(
            f"{label}: none of its {len(layers)} layers (roles: {roles}) matches a layer of the modules given "
            f"({given}); e.g. {example}",
            unmatched=unmatched[:20],
        )
    matched = sum(len(layer.keys) for layer in {id(m.layer): m.layer for m in matches}.values())
    if unmatched and matched < min_match * (matched + len(unmatched)):
        raise LoraIncompatible(
            f"{label}: only {matched} of {matched + len(unmatched)} keys match a layer of the modules given "
            f"({given}; at least {min_match:.0%} must): {', '.join(unmatched[:3])} ...",
            unmatched=unmatched[:20],
        )


__all__ = [
    "ROLES", "BackupPlace", "Delta", "Factors", "Layer", "LoraIncompatible", "LoraManager", "LoraReport",
    "Match", "parse_lora", "read_lora_file", "resolve",
]  # fmt: skip
