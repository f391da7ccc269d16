"""Known public files, by SHA-256: what shapes cannot settle.

The SDXL VAE has the very shapes of SD1's (a 4-channel KL-f8 autoencoder): from its header alone it
is filed ``sd1``. Files this widely shared are recognised by their published SHA-256 once the hasher
has read them (the hasher stores it); the entry then decides the base (and the encoder kind), with
the rule ``known_file:<file name>`` and full confidence. Type and components stay what the shapes say.

Each value below is the one published for the file on its Hugging Face page (the file's "SHA256"
in its LFS details), cross-checked against public download manifests that pin the same file by
hash (the sizes agree too). Add a file only with a value found in such a source, and cite it.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkeeper.discovery.records import Base, ComponentInfo, EncoderKind, Identification, ModelType

__all__ = ["KNOWN_FILES", "KnownFile", "apply_known", "known_file"]


@dataclass(frozen=True)
class KnownFile:
    name: str  # the file name it is published under
    type: ModelType
    base: Base
    size: int | None  # bytes, as published (None: not found beside the hash)
    source: str  # where the hash is published
    compatible: tuple[Base, ...] = ()  # for base "any": the bases it serves
    encoder: EncoderKind | None = None


#: SHA-256 (lowercase hex) -> the file.
KNOWN_FILES: dict[str, KnownFile] = {
    # https://huggingface.co/stabilityai/sdxl-vae/blob/main/sdxl_vae.safetensors
    "63aeecb90ff7bc1c115395962d3e803571385b61938377bc7089b36e81e92e2e": KnownFile(
        "sdxl_vae.safetensors",
        ModelType.VAE,
        Base.SDXL,
        334_641_164,
        "https://huggingface.co/stabilityai/sdxl-vae",
    ),
    # https://huggingface.co/stabilityai/sd-vae-ft-mse-original/blob/main/vae-ft-mse-840000-ema-pruned.safetensors
    "735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75": KnownFile(
        "vae-ft-mse-840000-ema-pruned.safetensors",
        ModelType.VAE,
        Base.SD1,
        334_641_190,
        "https://huggingface.co/stabilityai/sd-vae-ft-mse-original",
    ),
    # FLUX.1's autoencoder, https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/ae.safetensors
    # (the same bytes as FLUX.1-schnell's and the Comfy-Org repackages')
    "afc8e28272cd15db3919bacdb6918ce9c1ed22e96cb12c4d5ed0fba823529e38": KnownFile(
        "ae.safetensors",
        ModelType.VAE,
        Base.FLUX,
        335_304_388,
        "https://huggingface.co/black-forest-labs/FLUX.1-dev",
    ),
    # https://huggingface.co/comfyanonymous/flux_text_encoders/blob/main/clip_l.safetensors
    # (byte for byte SDXL base 1.0's text_encoder/model.fp16.safetensors)
    "660c6f5b1abae9dc498ac2d21e1347d2abdb0cf6c0c0c8576cd796491d9a6cdd": KnownFile(
        "clip_l.safetensors",
        ModelType.TEXT_ENCODER,
        Base.ANY,
        246_144_152,
        "https://huggingface.co/comfyanonymous/flux_text_encoders",
        (Base.SD1, Base.SDXL, Base.SD3, Base.FLUX),
        EncoderKind.CLIP_L,
    ),
    # SDXL base 1.0's text_encoder_2/model.fp16.safetensors, also shipped as clip_g.safetensors
    # https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/tree/main/text_encoder_2
    "ec310df2af79c318e24d20511b601a591ca8cd4f1fce1d8dff822a356bcdb1f4": KnownFile(
        "clip_g.safetensors",
        ModelType.TEXT_ENCODER,
        Base.ANY,
        None,
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0",
        (Base.SDXL, Base.SD3),
        EncoderKind.CLIP_G,
    ),
    # https://huggingface.co/comfyanonymous/flux_text_encoders/blob/main/t5xxl_fp16.safetensors
    "6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635": KnownFile(
        "t5xxl_fp16.safetensors",
        ModelType.TEXT_ENCODER,
        Base.ANY,
        9_787_841_024,
        "https://huggingface.co/comfyanonymous/flux_text_encoders",
        (Base.SD3, Base.FLUX),
        EncoderKind.T5_XXL,
    ),
    # https://huggingface.co/comfyanonymous/flux_text_encoders/blob/main/t5xxl_fp8_e4m3fn.safetensors
    "7d330da4816157540d6bb7838bf63a0f02f573fc48ca4d8de34bb0cbfd514f09": KnownFile(
        "t5xxl_fp8_e4m3fn.safetensors",
        ModelType.TEXT_ENCODER,
        Base.ANY,
        4_893_934_904,
        "https://huggingface.co/comfyanonymous/flux_text_encoders",
        (Base.SD3, Base.FLUX),
        EncoderKind.T5_XXL,
    ),
}


def known_file(sha256: str | None) -> KnownFile | None:
    """The known file with this SHA-256, if any."""
    return KNOWN_FILES.get(sha256.lower()) if sha256 else None


def apply_known(ident: Identification, known: KnownFile) -> Identification:
    """``ident`` with what the known file settles: its base (and the components' of its type),
    the bases it serves, its encoder kind; rule ``known_file:<name>``, confidence 1."""
    rule = f"known_file:{known.name}"

    def component(c: ComponentInfo) -> ComponentInfo:
        if c.kind is not known.type:
            return c
        update: dict[str, object] = {"base": known.base}
        if known.encoder is not None:
            update["encoder"] = known.encoder
        return c.model_copy(update=update)

    update: dict[str, object] = {
        "base": known.base,
        "compatible_bases": list(known.compatible),
        "components": [component(c) for c in ident.components],
        "rule": rule,
        "rules": {**ident.rules, "base": rule},
        "confidence": 1.0,
    }
    if known.encoder is not None:
        update["encoder"] = known.encoder
    return ident.model_copy(update=update)
