"""Rule tables for LoRAs: which format (kohya, LyCORIS LoHa / LoKr, diffusers, PEFT), which rank,
which base.

``LORA_FORMAT_RULES`` is tried in order: LyCORIS markers first (their files also carry kohya
names), then PEFT's ``lora_A`` / ``lora_B`` names (diffusers' current format), diffusers' older
attention-processor names, and kohya's ``lora_down`` / ``lora_up``. The rank is the most common ``dim`` of the ``rank`` pattern's
matches (LoKr factors have no single rank: ``None`` when unfactorised).

``LORA_PROBES`` measure, on the layers a LoRA patches, the dimensions that give its base away:
the input width of the cross-attention key projection (768 / 1024 / 2048 / 1280, as in a UNet),
the input width of the text encoder's MLP, the presence of a second text encoder or of DiT blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkeeper.discovery.records import Base, LoraFormat
from modelkeeper.discovery.rules.engine import KeyPattern, keys


@dataclass(frozen=True)
class LoraFormatRule:
    name: str
    format: LoraFormat
    marker: KeyPattern  # some key must match; group 1 is the patched module's name
    rank: KeyPattern | None  # keys whose ``rank_dim`` is the rank
    rank_dim: int = 0


LORA_FORMAT_RULES: tuple[LoraFormatRule, ...] = (
    LoraFormatRule("lora.lycoris.loha", LoraFormat.LOHA, keys(r"(.*)\.hada_w1_a"), keys(r".*\.hada_w1_b"), 0),
    LoraFormatRule(
        "lora.lycoris.lokr", LoraFormat.LOKR, keys(r"(.*)\.lokr_w[12](?:_[ab])?"), keys(r".*\.lokr_w2_a"), 1
    ),
    # PEFT names (lora_A / lora_B), whatever the prefix: diffusers' current format (unet., transformer.,
    # text_encoder.), PEFT's own (base_model.model.), ComfyUI / ai-toolkit exports (diffusion_model.).
    LoraFormatRule(
        "lora.peft",
        LoraFormat.PEFT,
        keys(r"(.*)\.lora_A(?:\.default)?\.weight"),
        keys(r".*\.lora_A(?:\.default)?\.weight"),
    ),
    # diffusers' attention-processor format, before PEFT: lora.down / lora_linear_layer.down / to_k_lora.
    LoraFormatRule(
        "lora.diffusers",
        LoraFormat.DIFFUSERS,
        keys(r"(.*?)\.(?:lora\.|lora_linear_layer\.|processor\.\w+_lora\.)down\.weight"),
        keys(r".*(?:\.lora\.|\.lora_linear_layer\.|_lora\.)down\.weight"),
    ),
    LoraFormatRule(
        "lora.kohya",
        LoraFormat.KOHYA,
        keys(r"(.*)\.lora_down\.weight"),
        keys(r".*\.lora_down\.weight"),
    ),
)

#: Which top-level part each patched module belongs to: prefix of the module name -> target.
LORA_TARGETS: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("unet.", "unet"),
    ("lora_transformer_", "transformer"),
    ("transformer.", "transformer"),
    ("diffusion_model.", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
    ("base_model.model.", "model"),
)


@dataclass(frozen=True)
class LoraProbe:
    """``dim`` of the first key ``pattern`` matches (presence when ``dim`` is None).

    With ``times`` the value is multiplied by ``dim`` of the first key ``times`` matches: a LoKr
    layer's input width is the product of its two Kronecker factors' widths."""

    name: str
    pattern: KeyPattern
    dim: int | None = None
    times: KeyPattern | None = None


_XATTN_K = r".*attn2[._]to_k"
_XATTN_K_PROCESSOR = r".*attn2\.processor\.to_k_lora\.down\.weight"

LORA_PROBES: tuple[LoraProbe, ...] = (
    LoraProbe(
        "cross_attention_width",
        keys(
            _XATTN_K
            + r"(?:\.lora_down|\.lora_A|\.lora\.down|\.lora_linear_layer\.down)(?:\.default)?\.weight"
        ),
        dim=1,
    ),
    LoraProbe("cross_attention_width", keys(_XATTN_K_PROCESSOR), dim=1),
    LoraProbe("cross_attention_width", keys(_XATTN_K + r"\.hada_w1_b"), dim=1),
    LoraProbe(
        "cross_attention_width",
        keys(_XATTN_K + r"\.lokr_w1(?:_b)?"),
        dim=1,
        times=keys(_XATTN_K + r"\.lokr_w2(?:_b)?"),
    ),
    LoraProbe(
        "text_encoder_width",
        keys(
            r"(?:lora_te1?_|text_encoder\.)text_model[._]encoder[._]layers[._]0[._]mlp[._]fc1(?:\.lora_down|\.lora_A|\.lora\.down)\.weight"
        ),
        dim=1,
    ),
    LoraProbe("text_encoder_2", keys(r"lora_te2_.*|text_encoder_2\..*")),
    LoraProbe(
        "flux_blocks",
        keys(
            r".*double_blocks[._]\d+[._].*|.*single_blocks[._]\d+[._].*|.*single_transformer_blocks[._]\d+[._].*"
        ),
    ),
    LoraProbe("sd3_blocks", keys(r".*joint_blocks[._]\d+[._].*")),
    LoraProbe(
        "dit_width",
        keys(
            r"(?:transformer\.|lora_transformer_)?transformer_blocks[._]\d+[._]attn[._]to_k(?:\.lora_down|\.lora_A)\.weight"
        ),
        dim=1,
    ),
)


@dataclass(frozen=True)
class LoraBaseRule:
    name: str
    when: dict[str, object]
    base: Base
    confidence: float = 1.0


LORA_BASE_RULES: tuple[LoraBaseRule, ...] = (
    LoraBaseRule("lora.flux_blocks", {"flux_blocks": True}, Base.FLUX),
    LoraBaseRule("lora.sd3_joint_blocks", {"sd3_blocks": True}, Base.SD3),
    LoraBaseRule("lora.dit_width_3072", {"dit_width": 3072}, Base.FLUX, 0.9),
    LoraBaseRule("lora.dit_width_1536", {"dit_width": 1536}, Base.SD3, 0.9),
    LoraBaseRule("lora.cross_attention_768", {"cross_attention_width": 768}, Base.SD1),
    LoraBaseRule("lora.cross_attention_1024", {"cross_attention_width": 1024}, Base.SD2),
    LoraBaseRule("lora.cross_attention_2048", {"cross_attention_width": 2048}, Base.SDXL),
    LoraBaseRule("lora.cross_attention_1280", {"cross_attention_width": 1280}, Base.SDXL_REFINER),
    LoraBaseRule("lora.second_text_encoder", {"text_encoder_2": True}, Base.SDXL, 0.8),
    LoraBaseRule("lora.text_encoder_768", {"text_encoder_width": 768}, Base.SD1, 0.8),
    LoraBaseRule("lora.text_encoder_1024", {"text_encoder_width": 1024}, Base.SD2, 0.8),
)
