"""A LoRA file's keys read into layers: which role (module) each names, its module name as the file
spells it, and its delta factors with their scale. Formats: kohya / sd-scripts, LyCORIS LoHa and
LoKr, full diffs, PEFT / diffusers (scales from ``lora_adapter_metadata``) and old diffusers."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from modelkeeper.formats.conventions import SAFETENSORS_SUFFIXES
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsupportedFormat
from modelkeeper.formats.safetensors_header import parse_header
from modelkeeper.protocol.messages import LORA_ROLES

StateDict = dict[str, torch.Tensor]
Algo = Literal["lora", "loha", "lokr", "full"]
#: Roles a LoRA file names (by key prefix) and a caller maps to modules; ``unet`` and
#: ``transformer`` both name the denoiser. The one list of the roles the LoRA code accepts.
ROLES = LORA_ROLES  # the one table of roles, in the protocol
#: The roles of :data:`ROLES` that name the denoiser.
DENOISER = ("unet", "transformer")


def read_lora_file(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """A LoRA file's tensors (on the CPU) and its safetensors metadata.

    The file is read once into memory, not mapped: a LoRA rewritten while it is read (a download
    or a copy over it) then gives a bad read, never a SIGBUS that would kill the worker."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFound(f"{path}: no such LoRA file", path=str(path))
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UnsupportedFormat(
            f"{path}: LoRAs are read from .safetensors files (convert pickle files first)", path=str(path)
        )
    try:
        data = path.read_bytes()
        (size,) = struct.unpack_from("<Q", data) if len(data) >= 8 else (0,)
        header = parse_header(data[8 : 8 + size], file_size=len(data), path=path)
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        raise InvalidModelFile(f"{path}: not a readable safetensors file: {exc}", path=str(path)) from None
    return tensors, dict(header.metadata)


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
