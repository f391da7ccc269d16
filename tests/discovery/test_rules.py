"""The rule tables: names are unique, literal prefilters are sound, and every rule fires where it
should (each has a case here: real key names, shapes edited where a variant needs it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from stripped import (
    Shapes,
    diffusers_state,
    flux_bfl,
    kohya_lora,
    sd3_mmdit,
    shapes_of,
    transformers_state,
    unet_original,
    vae_original,
    write_stripped,
)

from modelkeeper.discovery.folders import identify_component_folder
from modelkeeper.discovery.identify import identify_table
from modelkeeper.discovery.records import EncoderKind, Identification, ModelFormat
from modelkeeper.discovery.rules.components import (
    BASE_RULES,
    COMPONENT_RULES,
    ENCODER_RULES,
    PROBES,
    VARIANT_RULES,
)
from modelkeeper.discovery.rules.configs import CONFIG_BASE_RULES, CONFIG_CLASSES
from modelkeeper.discovery.rules.embeddings import EMBEDDING_RULES
from modelkeeper.discovery.rules.engine import KeyPattern, keys, literal_of
from modelkeeper.discovery.rules.lora import LORA_BASE_RULES, LORA_FORMAT_RULES, LORA_PROBES
from modelkeeper.discovery.tables import TensorMeta, TensorTable
from modelkeeper.formats.known_configs import load_known_config

TABLES: dict[str, tuple[Any, ...]] = {
    "component": COMPONENT_RULES,
    "base": BASE_RULES + CONFIG_BASE_RULES,
    "variant": VARIANT_RULES,
    "encoder": ENCODER_RULES,
    "lora": LORA_FORMAT_RULES,
    "lora_base": LORA_BASE_RULES,
    "embedding": EMBEDDING_RULES,
    "config": CONFIG_CLASSES,
}


def ident(shapes: Shapes, metadata: dict[str, str] | None = None) -> Identification:
    table = TensorTable({k: TensorMeta(d, s) for k, (d, s) in shapes.items()}, metadata or {})
    return identify_table(table, ModelFormat.SAFETENSORS)


def _edit(shapes: Shapes, key: str, shape: tuple[int, ...]) -> Shapes:
    out = dict(shapes)
    out[key] = (out[key][0], shape)
    return out


def _unet(base: str) -> Shapes:
    return shapes_of(diffusers_state("unet", base, "unet"), "F16")


def _folder(
    tmp: Path, config: dict[str, Any], shapes: Shapes, weights: str = "diffusion_pytorch_model.safetensors"
) -> Identification:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    write_stripped(tmp / weights, shapes)
    return identify_component_folder(tmp, {"config.json", weights})


def _flux_controlnet() -> Shapes:
    flux = shapes_of(diffusers_state("flux", "flux_dev", "transformer"), "BF16")
    keep = {
        k: v
        for k, v in flux.items()
        if not k.startswith(("single_transformer_blocks.", "proj_out", "norm_out"))
    }
    return {
        **keep,
        "controlnet_blocks.0.weight": ("BF16", (3072, 3072)),
        "controlnet_x_embedder.weight": ("BF16", (3072, 64)),
    }


def _sd3_controlnet() -> Shapes:
    sd3 = shapes_of(diffusers_state("sd3", "sd3", "transformer"), "F16")
    return {
        **sd3,
        "controlnet_blocks.0.weight": ("F16", (1536, 1536)),
        "pos_embed_input.proj.weight": ("F16", (1536, 16, 2, 2)),
    }


def _t5_gguf() -> Shapes:
    out: Shapes = {"token_embd.weight": ("F16", (32128, 4096))}
    for i in range(24):
        for part in ("attn_q", "attn_k", "attn_v", "attn_o"):
            out[f"enc.blk.{i}.{part}.weight"] = ("F16", (4096, 4096))
    return out


#: rule name -> (table, case): the case must be answered by that rule.
CASES: dict[str, Callable[[Path], Identification]] = {
    "controlnet.flux.diffusers": lambda _: ident(_flux_controlnet()),
    "controlnet.sd3.diffusers": lambda _: ident(_sd3_controlnet()),
    "vae.decoder_only.original": lambda _: ident(
        {
            k: v
            for k, v in shapes_of(vae_original("sd1", prefix=""), "F16").items()
            if k.startswith(("decoder.", "post_quant"))
        }
    ),
    "text_encoder.t5.gguf": lambda _: ident(_t5_gguf()),
    "unet.adm_2816": lambda _: ident(
        {k: v for k, v in shapes_of(unet_original("sdxl", prefix=""), "F16").items() if "attn2" not in k}
    ),
    "unet.adm_2560": lambda _: ident(
        {
            k: v
            for k, v in shapes_of(unet_original("sdxl_refiner", prefix=""), "F16").items()
            if "attn2" not in k
        }
    ),
    "unet.in_channels_8": lambda _: ident(_edit(_unet("sd1"), "conv_in.weight", (320, 8, 3, 3))),
    "flux.img_in_384": lambda _: ident(_edit(flux_bfl(guidance=True), "img_in.weight", (3072, 384))),
    "flux.img_in_128": lambda _: ident(_edit(flux_bfl(guidance=True), "img_in.weight", (3072, 128))),
    "sd3.depth_38": lambda _: ident(sd3_mmdit(depth=38)),
    "file.v_pred_marker": lambda _: ident({**_unet("sdxl"), "v_pred": ("F32", ())}),
    "meta.prediction_v": lambda _: ident(_unet("sdxl"), {"modelspec.prediction_type": "v"}),
    "meta.prediction_epsilon": lambda _: ident(_unet("sd2"), {"modelspec.prediction_type": "epsilon"}),
    "lora.sd3_joint_blocks": lambda _: ident(
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": ("F16", (8, 1536)),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": ("F16", (4608, 8)),
        }
    ),
    "lora.dit_width_3072": lambda _: ident(
        {
            "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": ("BF16", (4, 3072)),
            "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": ("BF16", (3072, 4)),
        }
    ),
    "lora.dit_width_1536": lambda _: ident(
        {
            "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": ("F16", (4, 1536)),
            "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": ("F16", (1536, 4)),
        }
    ),
    "lora.cross_attention_1280": lambda _: ident(kohya_lora("sdxl_refiner", rank=4, original_names=True)),
    "lora.second_text_encoder": lambda _: ident(
        {
            k: v
            for k, v in kohya_lora(
                "sdxl", rank=4, te=(("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))
            ).items()
            if k.startswith("lora_te")
        }
    ),
    "lora.text_encoder_768": lambda _: ident(
        {
            k: v
            for k, v in kohya_lora("sd1", rank=4, te=(("lora_te_", "text_encoder"),)).items()
            if "lora_te_" in k
        }
    ),
    "lora.text_encoder_1024": lambda _: ident(
        {
            k: v
            for k, v in kohya_lora("sd2", rank=4, te=(("lora_te_", "text_encoder"),)).items()
            if "lora_te_" in k
        }
    ),
    "embedding.a1111": lambda _: ident(
        {"string_to_param.*": ("F32", (2, 768)), "string_to_token.*": ("I64", ())}
    ),
    "embedding.single_tensor": lambda _: ident({"emb": ("F32", (1, 1024))}),
    "config.controlnet": lambda tmp: _folder(
        tmp, {"_class_name": "ControlNetModel", "cross_attention_dim": 768}, {"x": ("F16", (4,))}
    ),
    "config.controlnet.flux": lambda tmp: _folder(
        tmp, {"_class_name": "FluxControlNetModel"}, {"x": ("F16", (4,))}
    ),
    "config.controlnet.sd3": lambda tmp: _folder(
        tmp, {"_class_name": "SD3ControlNetModel"}, {"x": ("F16", (4,))}
    ),
    "config.transformer.sd3": lambda tmp: _folder(
        tmp,
        load_known_config("sd3", "transformer"),
        shapes_of(diffusers_state("sd3", "sd3", "transformer"), "F16"),
    ),
    "config.transformer.flux": lambda tmp: _folder(
        tmp, load_known_config("flux_schnell", "transformer"), {"x": ("F16", (4,))}
    ),
    "vae.config.scaling_0.18215": lambda tmp: _folder(
        tmp, load_known_config("sd1", "vae"), shapes_of(diffusers_state("vae", "sd1", "vae"), "F16")
    ),
    "vae.config.scaling_0.13025": lambda tmp: _folder(
        tmp, load_known_config("sdxl", "vae"), shapes_of(diffusers_state("vae", "sdxl", "vae"), "F16")
    ),
    "vae.config.scaling_1.5305": lambda tmp: _folder(
        tmp, load_known_config("sd3", "vae"), shapes_of(diffusers_state("vae", "sd3", "vae"), "F16")
    ),
    "vae.config.scaling_0.3611": lambda tmp: _folder(
        tmp, load_known_config("flux_dev", "vae"), {"x": ("F16", (4,))}
    ),
    "config.clip_text": lambda tmp: _folder(
        tmp, load_known_config("sd2", "text_encoder"), {"x": ("F16", (4,))}, "model.safetensors"
    ),
    "config.t5": lambda tmp: _folder(
        tmp, load_known_config("sd3", "text_encoder_3"), {"x": ("F16", (4,))}, "model.safetensors"
    ),
}

#: Rules the stripped and demo sets exercise already (see test_identify_*).
COVERED_ELSEWHERE = {
    "controlnet.original",
    "controlnet.diffusers",
    "unet.original",
    "unet.diffusers",
    "transformer.flux.original",
    "transformer.flux.diffusers",
    "transformer.sd3.original",
    "transformer.sd3.diffusers",
    "vae.original",
    "vae.diffusers",
    "text_encoder.clip.transformers",
    "text_encoder.openclip",
    "text_encoder.t5.transformers",
    "unet.cross_attention_768",
    "unet.cross_attention_1024",
    "unet.cross_attention_2048",
    "unet.cross_attention_1280",
    "vae.latent_4",
    "vae.latent_16",
    "unet.in_channels_9",
    "flux.guidance_embedder",
    "flux.no_guidance_embedder",
    "sd3.depth_24",
    "sd2.assume_v_prediction",
    "clip.width_768",
    "clip.width_1280",
    "clip.width_1024",
    "t5.width_4096",
    "t5.any_width",
    "lora.lycoris.loha",
    "lora.lycoris.lokr",
    "lora.peft",
    "lora.diffusers",
    "lora.kohya",
    "lora.flux_blocks",
    "lora.cross_attention_768",
    "lora.cross_attention_1024",
    "lora.cross_attention_2048",
    "embedding.sdxl",
    "embedding.emb_params",
    "embedding.diffusers",
    "config.unet",
    "config.vae",
}


def test_rule_names_are_unique() -> None:
    names = [r.name for rules in TABLES.values() for r in rules]
    assert len(names) == len(set(names))


def test_every_rule_has_a_case() -> None:
    names = {r.name for rules in TABLES.values() for r in rules}
    assert names == set(CASES) | COVERED_ELSEWHERE


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires(rule: str, tmp_path: Path) -> None:
    result = CASES[rule](tmp_path / "folder")
    fired = {result.rule, *result.rules.values()}
    fired |= {c.rule for c in result.components}
    assert rule in fired, (result.rule, result.rules)


def _patterns() -> list[KeyPattern]:
    out: list[KeyPattern] = []
    for rule in COMPONENT_RULES:
        out += [*rule.requires, *rule.excludes]
    out += [p.pattern for p in PROBES] + [p.pattern for p in LORA_PROBES]
    for lr in LORA_FORMAT_RULES:
        out += [lr.marker] + ([lr.rank] if lr.rank else [])
    for er in EMBEDDING_RULES:
        out += [*er.requires] + ([er.width_key] if er.width_key else [])
    return out


def test_literal_prefilters_are_sound() -> None:
    """One of a pattern's literals occurs in every key it matches (else the prefilter would hide matches)."""
    names: set[str] = set()
    for shapes in (
        _unet("sdxl"),
        shapes_of(unet_original("sd1"), "F16"),
        flux_bfl(guidance=True),
        sd3_mmdit(),
        kohya_lora("sd1", rank=4, te=(("lora_te_", "text_encoder"),)),
        shapes_of(transformers_state("sd3", "text_encoder_3"), "F16"),
        _t5_gguf(),
    ):
        names |= set(shapes)
    names |= {
        "string_to_param.*",
        "emb_params",
        "clip_l",
        "clip_g",
        "<tok>",
        "x.hada_w1_a",
        "x.lokr_w1",
        "x.lokr_w2_a",
    }
    for pattern in _patterns():
        for name in names:
            if pattern.regex.fullmatch(name) and pattern.literals:
                assert any(lit in name for lit in pattern.literals), (pattern.source, name)


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (r"(.*)\.hada_w1_a", ".hada_w1_a"),
        (r".*attn2\.to_k\.weight", "attn2.to_k.weight"),
        (r"input_blocks\.0\.0\.weight|conv_in\.weight", ""),
        (r"(?:transformer\.)?text_model\.x", "text_model.x"),
        (r"model_ema\.decay?", "model_ema.deca"),
        (r"abc[de]f", "abc"),
    ],
)
def test_literal_of(pattern: str, literal: str) -> None:
    assert literal_of(pattern) == literal


def test_alternatives_get_one_literal_each() -> None:
    assert keys(r"input_blocks\.0\.0\.weight|conv_in\.weight").literals == (
        "input_blocks.0.0.weight",
        "conv_in.weight",
    )
    assert keys(r"a(?:b|c)d").literals == ("d",) or keys(r"a(?:b|c)d").literals == ("a",)
    assert keys(r".+|x").literals == ()


def test_llama_cpp_t5_names_are_identified_as_a_loadable_t5_xxl() -> None:
    """city96's T5 GGUFs keep llama.cpp's names (``enc.blk.0.attn_q``); the worker converts them
    (``formats.llama_t5``)."""
    found = ident(_t5_gguf())
    assert (found.type.value, found.encoder, found.loadable) == ("text_encoder", EncoderKind.T5_XXL, True)
