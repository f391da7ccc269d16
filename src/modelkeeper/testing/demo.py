"""``write_demo_models``: the whole tiny demo set on disk, with its ``manifest.json``.

Layout (ComfyUI-like folders, plus diffusers folders and tokenizers)::

    checkpoints/   full single-file checkpoints, original layout (UNet + VAE + text encoders)
    unet/          single-file UNets (original layout, and one in diffusers layout)
    vae/           single-file VAEs
    clip/          single-file text encoders (CLIP-L, OpenCLIP bigG, T5)
    loras/         kohya, diffusers/PEFT, LyCORIS LoHa and LoKr
    embeddings/    textual inversion (A1111, diffusers, SDXL)
    diffusers/     pipeline folders and standalone component folders
    tokenizers/    CLIP and T5 tokenizer folders
    manifest.json  ground truth, one entry per file or folder (see :mod:`modelkeeper.testing.manifest`)

Every component is built from a fixed seed, so all forms of one component hold the same tensors
(the SD1 VAE inside ``checkpoints/tiny-sd15.safetensors`` equals ``diffusers/tiny-sd15/vae``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection

from modelkeeper.testing.components import (
    DEFAULT_SEED,
    EncoderKind,
    TextEncoder,
    UNetKind,
    VaeKind,
    component_config,
    encoder_kind,
    make_text_encoder,
    make_unet,
    make_vae,
)
from modelkeeper.testing.embeddings import DEFAULT_TOKEN, save_embedding
from modelkeeper.testing.files import (
    CONFIG_METADATA_KEY,
    ORIGINAL_PREFIX,
    PIPELINE_CLASS,
    PIPELINE_ENCODERS,
    ComponentKind,
    PipelineBase,
    assemble_pipeline,
    checkpoint_config,
    save_checkpoint,
    save_component_folder,
    save_pipeline_folder,
    save_single_file,
)
from modelkeeper.testing.loras import (
    DEFAULT_RANK,
    TRIGGER_WORD,
    save_kohya_lora,
    save_lycoris,
    save_peft_lora,
)
from modelkeeper.testing.manifest import DemoEntry, DemoManifest
from modelkeeper.testing.tokenizer import save_clip_tokenizer, save_t5_tokenizer

Progress = Callable[[str], None]


@dataclass
class _Context:
    """The demo root and the components built so far (each built once, reused by every form)."""

    root: Path
    seed: int
    cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    def pipeline(self, kind: PipelineBase) -> Any:
        """The pipeline of ``kind`` around the cached components (float16: only saved, never run)."""
        vae_kind: VaeKind = "sdxl" if kind.startswith("sdxl") else "sd1"
        return self._cached(
            "pipeline",
            kind,
            lambda: assemble_pipeline(
                kind,
                unet=self.unet(kind),
                vae=self.vae(vae_kind),
                text_encoders=[self.encoder(e) for e in PIPELINE_ENCODERS[kind]],
            ),
        )

    def unet(self, kind: UNetKind) -> Any:
        return self._cached("unet", kind, lambda: make_unet(kind, seed=self.seed, dtype=torch.float16))

    def vae(self, kind: VaeKind) -> Any:
        return self._cached("vae", kind, lambda: make_vae(kind, seed=self.seed, dtype=torch.float16))

    def encoder(self, kind: EncoderKind) -> Any:
        return self._cached(
            "encoder", kind, lambda: make_text_encoder(kind, seed=self.seed, dtype=torch.float16)
        )

    def _cached(self, family: str, kind: str, build: Callable[[], Any]) -> Any:
        if (family, kind) not in self.cache:
            self.cache[(family, kind)] = build()
        return self.cache[(family, kind)]

    def file_entry(self, path: Path, **fields: Any) -> DemoEntry:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        with safe_open(str(path), framework="pt") as handle:
            count = len(list(handle.keys()))
            metadata = handle.metadata() or {}
        return DemoEntry(
            path=path.relative_to(self.root).as_posix(),
            format="safetensors",
            tensor_count=count,
            size_bytes=path.stat().st_size,
            sha256=digest.hexdigest(),
            config_metadata=CONFIG_METADATA_KEY in metadata,
            **fields,
        )

    def folder_entry(self, folder: Path, **fields: Any) -> DemoEntry:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return DemoEntry(path=folder.relative_to(self.root).as_posix(), size_bytes=size, **fields)


_Writer = Callable[[_Context], DemoEntry]
_WRITERS: dict[str, tuple[bool, _Writer]] = {}


def _writer(name: str, *, extra: bool = False) -> Callable[[Callable[[_Context, str], DemoEntry]], None]:
    def register(function: Callable[[_Context, str], DemoEntry]) -> None:
        _WRITERS[name] = (extra, lambda ctx: function(ctx, name))

    return register


def demo_entry_names(*, extras: bool = False) -> list[str]:
    """The names of the entries :func:`write_demo_models` writes (with ``extras``, the optional ones too)."""
    return [name for name, (is_extra, _) in _WRITERS.items() if extras or not is_extra]


# ---------------------------------------------------------------------------------------------- dims


def _unet_dims(unet: UNet2DConditionModel) -> dict[str, int]:
    config = unet.config
    dims = {"in_channels": config["in_channels"], "cross_attention_dim": config["cross_attention_dim"]}
    if config["projection_class_embeddings_input_dim"]:
        dims["addition_embed_input_dim"] = config["projection_class_embeddings_input_dim"]
    return dims


def _vae_dims(vae: AutoencoderKL) -> dict[str, int]:
    return {"latent_channels": vae.config["latent_channels"]}


def _encoder_dims(encoder: torch.nn.Module) -> dict[str, int]:
    config = component_config(encoder)
    if encoder_kind(encoder) == "t5":
        return {"hidden_size": config["d_model"]}
    dims = {"hidden_size": config["hidden_size"]}
    if isinstance(encoder, CLIPTextModelWithProjection):
        dims["projection_dim"] = config["projection_dim"]
    return dims


_VAE_ALSO: dict[VaeKind, tuple[str, ...]] = {
    "sd1": ("sd2", "sdxl"),
    "sdxl": ("sd1", "sd2"),
    "flux": ("sd3",),
    "sd3": ("flux",),
}
_ENCODER_BASES: dict[EncoderKind, tuple[str, tuple[str, ...]]] = {
    "clip_l": ("sd1", ("sdxl", "sd3", "flux")),
    "clip_g": ("sdxl", ("sdxl_refiner", "sd3")),
    "clip_h": ("sd2", ()),
    "t5": ("flux", ("sd3",)),
}


def _base_of(kind: PipelineBase) -> tuple[str, str]:
    """(base, variant) of a UNet / pipeline kind."""
    return ("sd1", "inpaint") if kind == "sd1_inpaint" else (kind, "normal")


# ----------------------------------------------------------------------------------------- checkpoints


def _checkpoint(ctx: _Context, name: str, kind: PipelineBase, filename: str) -> DemoEntry:
    pipe = ctx.pipeline(kind)
    encoders = tuple(getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None))
    path = save_checkpoint(
        ctx.root / "checkpoints" / filename, base=kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders
    )
    base, variant = _base_of(kind)
    return ctx.file_entry(
        path,
        name=name,
        type="main",
        base=base,
        variant=variant,
        layout="original",
        components=("unet", "vae", *PIPELINE_ENCODERS[kind]),
        class_name=PIPELINE_CLASS[kind].__name__,
        config=checkpoint_config(kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders),
        dtype="float16",
        dims={**_unet_dims(pipe.unet), **_vae_dims(pipe.vae)},
    )


@_writer("sd15-checkpoint")
def _sd15_checkpoint(ctx: _Context, name: str) -> DemoEntry:
    return _checkpoint(ctx, name, "sd1", "tiny-sd15.safetensors")


@_writer("sdxl-checkpoint")
def _sdxl_checkpoint(ctx: _Context, name: str) -> DemoEntry:
    return _checkpoint(ctx, name, "sdxl", "tiny-sdxl.safetensors")


@_writer("sd15-inpaint-checkpoint", extra=True)
def _sd15_inpaint_checkpoint(ctx: _Context, name: str) -> DemoEntry:
    return _checkpoint(ctx, name, "sd1_inpaint", "tiny-sd15-inpaint.safetensors")


@_writer("sd2-checkpoint", extra=True)
def _sd2_checkpoint(ctx: _Context, name: str) -> DemoEntry:
    return _checkpoint(ctx, name, "sd2", "tiny-sd2-v.safetensors")


# ------------------------------------------------------------------------------------ single components


def _component_file(
    ctx: _Context,
    name: str,
    module: UNet2DConditionModel | AutoencoderKL | TextEncoder,
    relative: str,
    *,
    layout: str,
    prefix: str | None = None,
    metadata: bool = True,
    entry: dict[str, Any],
) -> DemoEntry:
    kind: ComponentKind
    if isinstance(module, UNet2DConditionModel):
        kind, dims, class_name = "unet", _unet_dims(module), "UNet2DConditionModel"
    elif isinstance(module, AutoencoderKL):
        kind, dims, class_name = "vae", _vae_dims(module), "AutoencoderKL"
    else:
        kind, dims, class_name = encoder_kind(module), _encoder_dims(module), type(module).__name__
    path = save_single_file(
        module,
        ctx.root / relative,
        layout="original" if layout == "original" else "diffusers",
        prefix=prefix,
        with_config_metadata=metadata,
    )
    if prefix is None:
        prefix = ORIGINAL_PREFIX[kind] if layout == "original" else ""
    return ctx.file_entry(
        path,
        name=name,
        layout=layout,
        class_name=class_name,
        prefix=prefix,
        config=component_config(module),
        dtype="float16",
        dims=dims,
        **entry,
    )


def _unet_file(ctx: _Context, name: str, kind: UNetKind, relative: str, **options: Any) -> DemoEntry:
    base, variant = _base_of(kind)
    return _component_file(
        ctx,
        name,
        ctx.unet(kind),
        relative,
        entry={"type": "unet", "base": base, "variant": variant},
        **options,
    )


@_writer("sd15-unet")
def _sd15_unet(ctx: _Context, name: str) -> DemoEntry:
    return _unet_file(ctx, name, "sd1", "unet/tiny-sd15-unet.safetensors", layout="diffusers")


@_writer("sd15-inpaint-unet")
def _sd15_inpaint_unet(ctx: _Context, name: str) -> DemoEntry:
    return _unet_file(ctx, name, "sd1_inpaint", "unet/tiny-sd15-inpaint-unet.safetensors", layout="original")


@_writer("sd2-unet")
def _sd2_unet(ctx: _Context, name: str) -> DemoEntry:
    return _unet_file(ctx, name, "sd2", "unet/tiny-sd2-unet.safetensors", layout="original", prefix="")


@_writer("sdxl-unet")
def _sdxl_unet(ctx: _Context, name: str) -> DemoEntry:
    relative = "unet/tiny-sdxl-unet.safetensors"
    return _unet_file(ctx, name, "sdxl", relative, layout="original", prefix="", metadata=False)


@_writer("sdxl-refiner-unet")
def _sdxl_refiner_unet(ctx: _Context, name: str) -> DemoEntry:
    return _unet_file(ctx, name, "sdxl_refiner", "unet/tiny-sdxl-refiner-unet.safetensors", layout="original")


def _vae_file(ctx: _Context, name: str, kind: VaeKind, relative: str, **options: Any) -> DemoEntry:
    entry = {"type": "vae", "base": kind, "also_bases": _VAE_ALSO[kind]}
    return _component_file(ctx, name, ctx.vae(kind), relative, entry=entry, **options)


@_writer("sd15-vae")
def _sd15_vae(ctx: _Context, name: str) -> DemoEntry:
    return _vae_file(
        ctx, name, "sd1", "vae/tiny-sd15-vae.safetensors", layout="original", prefix="", metadata=False
    )


@_writer("sdxl-vae")
def _sdxl_vae(ctx: _Context, name: str) -> DemoEntry:
    return _vae_file(ctx, name, "sdxl", "vae/tiny-sdxl-vae.safetensors", layout="diffusers")


@_writer("flux-vae")
def _flux_vae(ctx: _Context, name: str) -> DemoEntry:
    return _vae_file(ctx, name, "flux", "vae/tiny-flux-vae.safetensors", layout="original", prefix="")


def _encoder_file(ctx: _Context, name: str, kind: EncoderKind, relative: str, **options: Any) -> DemoEntry:
    base, also = _ENCODER_BASES[kind]
    entry = {"type": "text_encoder", "base": base, "also_bases": also, "encoder": kind}
    return _component_file(ctx, name, ctx.encoder(kind), relative, entry=entry, **options)


@_writer("clip-l")
def _clip_l(ctx: _Context, name: str) -> DemoEntry:
    return _encoder_file(ctx, name, "clip_l", "clip/tiny-clip-l.safetensors", layout="original")


@_writer("clip-g")
def _clip_g(ctx: _Context, name: str) -> DemoEntry:
    return _encoder_file(ctx, name, "clip_g", "clip/tiny-clip-g.safetensors", layout="original")


@_writer("t5")
def _t5(ctx: _Context, name: str) -> DemoEntry:
    return _encoder_file(ctx, name, "t5", "clip/tiny-t5.safetensors", layout="diffusers")


# ---------------------------------------------------------------------------------------- diffusers


def _pipeline_folder(ctx: _Context, name: str, kind: PipelineBase, folder: str) -> DemoEntry:
    pipe = ctx.pipeline(kind)
    path = save_pipeline_folder(pipe, ctx.root / "diffusers" / folder)
    base, variant = _base_of(kind)
    encoders = tuple(getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None))
    return ctx.folder_entry(
        path,
        name=name,
        type="main",
        base=base,
        variant=variant,
        format="diffusers",
        layout="diffusers",
        components=("unet", "vae", *PIPELINE_ENCODERS[kind]),
        class_name=type(pipe).__name__,
        config=checkpoint_config(kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders),
        dtype="float16",
        prediction_type=pipe.scheduler.config.prediction_type,
        dims={**_unet_dims(pipe.unet), **_vae_dims(pipe.vae)},
    )


@_writer("sd15-pipeline")
def _sd15_pipeline(ctx: _Context, name: str) -> DemoEntry:
    return _pipeline_folder(ctx, name, "sd1", "tiny-sd15")


@_writer("sdxl-pipeline")
def _sdxl_pipeline(ctx: _Context, name: str) -> DemoEntry:
    return _pipeline_folder(ctx, name, "sdxl", "tiny-sdxl")


@_writer("sd2-pipeline", extra=True)
def _sd2_pipeline(ctx: _Context, name: str) -> DemoEntry:
    return _pipeline_folder(ctx, name, "sd2", "tiny-sd2-v")


@_writer("sd15-unet-folder")
def _sd15_unet_folder(ctx: _Context, name: str) -> DemoEntry:
    unet = ctx.unet("sd1")
    path = save_component_folder(
        unet, ctx.root / "diffusers/tiny-sd15-unet", dtype=torch.float32, variants=("fp16",)
    )
    return ctx.folder_entry(
        path,
        name=name,
        type="unet",
        base="sd1",
        format="diffusers",
        layout="diffusers",
        class_name="UNet2DConditionModel",
        config=component_config(unet),
        dtype="float32",
        weights_variants=("fp16",),
        dims=_unet_dims(unet),
    )


@_writer("flux-vae-folder")
def _flux_vae_folder(ctx: _Context, name: str) -> DemoEntry:
    vae = ctx.vae("flux")
    path = save_component_folder(vae, ctx.root / "diffusers/tiny-flux-vae")
    return ctx.folder_entry(
        path,
        name=name,
        type="vae",
        base="flux",
        also_bases=_VAE_ALSO["flux"],
        format="diffusers",
        layout="diffusers",
        class_name="AutoencoderKL",
        config=component_config(vae),
        dtype="float16",
        dims=_vae_dims(vae),
    )


@_writer("t5-folder")
def _t5_folder(ctx: _Context, name: str) -> DemoEntry:
    t5 = ctx.encoder("t5")
    path = save_component_folder(t5, ctx.root / "diffusers/tiny-t5")
    base, also = _ENCODER_BASES["t5"]
    return ctx.folder_entry(
        path,
        name=name,
        type="text_encoder",
        base=base,
        also_bases=also,
        encoder="t5",
        format="diffusers",
        layout="diffusers",
        class_name="T5EncoderModel",
        config=component_config(t5),
        dtype="float16",
        dims=_encoder_dims(t5),
    )


@_writer("clip-tokenizer")
def _clip_tokenizer(ctx: _Context, name: str) -> DemoEntry:
    path = save_clip_tokenizer(ctx.root / "tokenizers/clip")
    fields = {
        "type": "tokenizer",
        "format": "tokenizer",
        "layout": "diffusers",
        "class_name": "CLIPTokenizer",
    }
    return ctx.folder_entry(path, name=name, base=None, encoder="clip_l", **fields)


@_writer("t5-tokenizer")
def _t5_tokenizer(ctx: _Context, name: str) -> DemoEntry:
    path = save_t5_tokenizer(ctx.root / "tokenizers/t5")
    fields = {"type": "tokenizer", "format": "tokenizer", "layout": "diffusers", "class_name": "T5Tokenizer"}
    return ctx.folder_entry(path, name=name, base=None, encoder="t5", **fields)


# ----------------------------------------------------------------------------------- LoRAs, embeddings


def _lora_entry(
    ctx: _Context, path: Path, name: str, *, base: str, layout: str, components: tuple[str, ...]
) -> DemoEntry:
    return ctx.file_entry(
        path,
        name=name,
        type="lora",
        base=base,
        layout=layout,
        components=components,
        dtype="float16",
        dims={"rank": DEFAULT_RANK},
        trigger_words=(TRIGGER_WORD,) if layout != "peft" else (),
    )


@_writer("sd15-lora-kohya")
def _sd15_lora_kohya(ctx: _Context, name: str) -> DemoEntry:
    path = save_kohya_lora(ctx.root / "loras/tiny-sd15-kohya.safetensors", "sd1", seed=ctx.seed)
    return _lora_entry(ctx, path, name, base="sd1", layout="kohya", components=("unet", "text_encoder"))


@_writer("sd15-lora-peft")
def _sd15_lora_peft(ctx: _Context, name: str) -> DemoEntry:
    path = save_peft_lora(ctx.root / "loras/tiny-sd15-peft.safetensors", "sd1", seed=ctx.seed)
    return _lora_entry(ctx, path, name, base="sd1", layout="peft", components=("unet", "text_encoder"))


@_writer("sd15-loha")
def _sd15_loha(ctx: _Context, name: str) -> DemoEntry:
    path = save_lycoris(ctx.root / "loras/tiny-sd15-loha.safetensors", "loha", seed=ctx.seed)
    return _lora_entry(ctx, path, name, base="sd1", layout="loha", components=("unet",))


@_writer("sd15-lokr")
def _sd15_lokr(ctx: _Context, name: str) -> DemoEntry:
    path = save_lycoris(ctx.root / "loras/tiny-sd15-lokr.safetensors", "lokr", seed=ctx.seed)
    return _lora_entry(ctx, path, name, base="sd1", layout="lokr", components=("unet",))


@_writer("sdxl-lora-kohya")
def _sdxl_lora_kohya(ctx: _Context, name: str) -> DemoEntry:
    path = save_kohya_lora(ctx.root / "loras/tiny-sdxl-kohya.safetensors", "sdxl", seed=ctx.seed)
    return _lora_entry(
        ctx, path, name, base="sdxl", layout="kohya", components=("unet", "text_encoder", "text_encoder_2")
    )


@_writer("sdxl-lora-peft")
def _sdxl_lora_peft(ctx: _Context, name: str) -> DemoEntry:
    path = save_peft_lora(ctx.root / "loras/tiny-sdxl-peft.safetensors", "sdxl", seed=ctx.seed)
    return _lora_entry(
        ctx, path, name, base="sdxl", layout="peft", components=("unet", "text_encoder", "text_encoder_2")
    )


def _embedding(ctx: _Context, name: str, relative: str, layout: Any, base: Any) -> DemoEntry:
    path = save_embedding(ctx.root / relative, layout, base=base, seed=ctx.seed)
    widths = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[base]
    return ctx.file_entry(
        path,
        name=name,
        type="textual_inversion",
        base=base,
        layout=layout,
        components=tuple(widths),
        dtype="float32",
        dims={"vectors": 2, **{f"{k}_width": v for k, v in widths.items()}},
        token=DEFAULT_TOKEN if layout == "diffusers" else None,
    )


@_writer("sd15-embedding-a1111")
def _sd15_embedding_a1111(ctx: _Context, name: str) -> DemoEntry:
    return _embedding(ctx, name, "embeddings/tiny-sd15-a1111.safetensors", "a1111", "sd1")


@_writer("sd15-embedding-diffusers")
def _sd15_embedding_diffusers(ctx: _Context, name: str) -> DemoEntry:
    return _embedding(ctx, name, "embeddings/tiny-sd15-diffusers.safetensors", "diffusers", "sd1")


@_writer("sd2-embedding-a1111")
def _sd2_embedding_a1111(ctx: _Context, name: str) -> DemoEntry:
    return _embedding(ctx, name, "embeddings/tiny-sd2-a1111.safetensors", "a1111", "sd2")


@_writer("sdxl-embedding")
def _sdxl_embedding(ctx: _Context, name: str) -> DemoEntry:
    return _embedding(ctx, name, "embeddings/tiny-sdxl.safetensors", "sdxl", "sdxl")


# ---------------------------------------------------------------------------------------- entry point


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Thousands of tiny tensor operations run fastest on one thread (no pool wake-ups); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_demo_models(
    root: Path,
    *,
    progress: Progress | None = None,
    only: Collection[str] | None = None,
    extras: bool = False,
    seed: int = DEFAULT_SEED,
) -> DemoManifest:
    """Write the tiny demo set under ``root`` and its ``manifest.json``; return the manifest.

    ``only`` restricts it to some entry names (see :func:`demo_entry_names`); ``extras`` adds the
    optional entries (an SD2 v-prediction pipeline and checkpoint, an SD1 inpainting checkpoint).
    ``progress`` is called with one line per entry written. The same ``seed`` gives the same bytes.
    """
    names = demo_entry_names(extras=extras or only is not None)
    if only is not None:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"unknown demo entries: {sorted(unknown)}")
        names = [n for n in names if n in only]
    root.mkdir(parents=True, exist_ok=True)
    ctx = _Context(root=root, seed=seed)
    entries: list[DemoEntry] = []
    with _one_torch_thread():
        for name in names:
            entry = _WRITERS[name][1](ctx)
            entries.append(entry)
            if progress is not None:
                progress(
                    f"{entry.path}  ({entry.type}, {entry.base or '-'}, {entry.size_bytes / 1e6:.1f} MB)"
                )
    manifest = DemoManifest(root=root, entries=tuple(entries), seed=seed)
    manifest.write()
    return manifest


__all__ = ["Progress", "demo_entry_names", "write_demo_models"]
