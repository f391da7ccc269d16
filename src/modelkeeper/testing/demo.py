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
(the SD1 VAE inside ``checkpoints/tiny-sd15.safetensors`` equals ``diffusers/tiny-sd15/vae``), and the
same seed writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from modelkeeper.testing.components import (
    DEFAULT_SEED,
    EncoderKind,
    VaeKind,
    component_config,
    make_text_encoder,
    make_transformer,
    make_unet,
    make_vae,
    state_dict_for_save,
)
from modelkeeper.testing.embeddings import DEFAULT_TOKEN, save_embedding
from modelkeeper.testing.files import (
    CONFIG_METADATA_KEY,
    ORIGINAL_PREFIX,
    PIPELINE_CLASS,
    PIPELINE_ENCODERS,
    PipelineBase,
    assemble_pipeline,
    checkpoint_config,
    component_kind,
    save_checkpoint,
    save_component_folder,
    save_pipeline_folder,
    save_single_file,
    to_original_layout,
    write_safetensors,
)
from modelkeeper.testing.fp8_files import packed_state
from modelkeeper.testing.gguf_files import GGUF_TYPES, write_gguf, write_llama_t5_gguf
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

# Bases that the same tensors fit equally: shapes alone cannot tell these apart.
_VAE_BASES: dict[VaeKind, tuple[str, tuple[str, ...]]] = {
    "sd1": ("sd1", ("sd2", "sdxl")),
    "sdxl": ("sdxl", ("sd1", "sd2")),
    "flux": ("flux", ("sd3",)),
    "sd3": ("sd3", ("flux",)),
}
_ENCODER_BASES: dict[EncoderKind, tuple[str, tuple[str, ...]]] = {
    "clip_l": ("sd1", ("sdxl", "sd3", "flux")),
    "clip_g": ("sdxl", ("sdxl_refiner", "sd3")),
    "clip_h": ("sd2", ()),
    "t5": ("flux", ("sd3",)),
}
_EMBEDDING_WIDTHS = {"sd1": {"clip_l": 768}, "sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}
_LORA_TARGETS = {"sd1": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}


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
            ("pipeline", kind),
            lambda: assemble_pipeline(
                kind,
                unet=self.component("unet", kind),
                vae=self.component("vae", vae_kind),
                text_encoders=[self.component("encoder", e) for e in PIPELINE_ENCODERS[kind]],
            ),
        )

    def component(self, family: str, kind: str) -> Any:
        """The float16 UNet, VAE or text encoder of ``kind``."""
        builders: dict[str, Callable[..., Any]] = {
            "unet": make_unet,
            "vae": make_vae,
            "encoder": make_text_encoder,
            "transformer": make_transformer,
        }
        return self._cached(
            (family, kind), lambda: builders[family](kind, seed=self.seed, dtype=torch.float16)
        )

    def _cached(self, key: tuple[str, str], build: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

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

    def gguf_entry(self, path: Path, **fields: Any) -> DemoEntry:
        from modelkeeper.formats.gguf_header import read_gguf_header

        header = read_gguf_header(path)
        return DemoEntry(
            path=path.relative_to(self.root).as_posix(), format="gguf", tensor_count=len(header.tensors),
            size_bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            config_metadata=CONFIG_METADATA_KEY in header.metadata, **fields,
        )  # fmt: skip

    def folder_entry(self, folder: Path, **fields: Any) -> DemoEntry:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return DemoEntry(path=folder.relative_to(self.root).as_posix(), size_bytes=size, **fields)


@dataclass(frozen=True)
class _Spec:
    """One demo entry: its name, where it goes, how it is written, and the options of that writer."""

    name: str
    path: str
    write: Callable[[_Context, _Spec], DemoEntry]
    kind: str
    family: str = ""  # single components: unet, vae or encoder
    layout: str = "original"
    prefix: str | None = None  # single files: None = where a full checkpoint keeps the component
    metadata: bool = True  # single files: carry the modelkeeper.config entry
    extra: bool = False  # written only on request
    form: str = ""  # packed files: an fp8 form (testing.fp8_files.FP8_FORMS) or a GGUF type


# ------------------------------------------------------------------------------------------ dimensions


def _dims(module: torch.nn.Module) -> dict[str, int]:
    """The discriminating dimensions of a component, from its config."""
    config = component_config(module)
    kind = component_kind(module)
    if kind == "unet":
        dims = {"in_channels": config["in_channels"], "cross_attention_dim": config["cross_attention_dim"]}
        if config["projection_class_embeddings_input_dim"]:
            dims["addition_embed_input_dim"] = config["projection_class_embeddings_input_dim"]
        return dims
    if kind == "vae":
        return {"latent_channels": config["latent_channels"]}
    if kind == "t5":
        return {"hidden_size": config["d_model"]}
    dims = {"hidden_size": config["hidden_size"]}
    if kind == "clip_g":
        dims["projection_dim"] = config["projection_dim"]
    return dims


def _describe(module: torch.nn.Module, kind: str) -> dict[str, Any]:
    """type, base, variant, encoder and also_bases of a component of ``kind``."""
    family = component_kind(module)
    if family == "unet":
        base, variant = ("sd1", "inpaint") if kind == "sd1_inpaint" else (kind, "normal")
        return {"type": "unet", "base": base, "variant": variant}
    if family == "vae":
        base, also = _VAE_BASES[kind]  # type: ignore[index]
        return {"type": "vae", "base": base, "also_bases": also}
    base, also = _ENCODER_BASES[family]
    return {"type": "text_encoder", "base": base, "also_bases": also, "encoder": family}


# ------------------------------------------------------------------------------------------- writers


def _checkpoint(ctx: _Context, spec: _Spec) -> DemoEntry:
    kind: PipelineBase = spec.kind  # type: ignore[assignment]
    pipe = ctx.pipeline(kind)
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)]
    path = save_checkpoint(
        ctx.root / spec.path, base=kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders
    )
    return ctx.file_entry(
        path,
        name=spec.name,
        **{**_describe(pipe.unet, kind), "type": "main"},
        layout="original",
        components=("unet", "vae", *PIPELINE_ENCODERS[kind]),
        class_name=PIPELINE_CLASS[kind].__name__,
        config=checkpoint_config(kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders),
        dtype="float16",
        dims={**_dims(pipe.unet), **_dims(pipe.vae)},
    )


def _pipeline(ctx: _Context, spec: _Spec) -> DemoEntry:
    kind: PipelineBase = spec.kind  # type: ignore[assignment]
    pipe = ctx.pipeline(kind)
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)]
    path = save_pipeline_folder(pipe, ctx.root / spec.path)
    return ctx.folder_entry(
        path,
        name=spec.name,
        **{**_describe(pipe.unet, kind), "type": "main"},
        format="diffusers",
        layout="diffusers",
        components=("unet", "vae", *PIPELINE_ENCODERS[kind]),
        class_name=type(pipe).__name__,
        config=checkpoint_config(kind, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders),
        dtype="float16",
        prediction_type=pipe.scheduler.config.prediction_type,
        dims={**_dims(pipe.unet), **_dims(pipe.vae)},
    )


def _file(ctx: _Context, spec: _Spec) -> DemoEntry:
    module = ctx.component(spec.family, spec.kind)
    path = save_single_file(
        module,
        ctx.root / spec.path,
        layout="original" if spec.layout == "original" else "diffusers",
        prefix=spec.prefix,
        with_config_metadata=spec.metadata,
    )
    prefix = spec.prefix
    if prefix is None:
        prefix = ORIGINAL_PREFIX[component_kind(module)] if spec.layout == "original" else ""
    return ctx.file_entry(
        path,
        name=spec.name,
        **_describe(module, spec.kind),
        layout=spec.layout,
        class_name=type(module).__name__,
        prefix=prefix,
        config=component_config(module),
        dtype="float16",
        dims=_dims(module),
    )


def _packed(ctx: _Context, spec: _Spec) -> DemoEntry:
    """A transformer or UNet file in a packed form: fp8, scaled fp8 (safetensors) or a GGUF type."""
    module = ctx.component(spec.family, spec.kind)
    config = component_config(module)
    if spec.kind == "t5" and spec.path.endswith(".gguf"):
        return _llama_t5_gguf(ctx, spec, module, config)
    state = state_dict_for_save(module)
    prefix = spec.prefix or ""
    if spec.layout == "original":
        state = to_original_layout("unet", state, config, prefix=prefix)
    path = ctx.root / spec.path
    fields: dict[str, Any] = {
        "name": spec.name, "layout": spec.layout, "class_name": type(module).__name__, "prefix": prefix,
        "config": config,
    }  # fmt: skip
    if spec.family == "transformer":
        fields |= {"type": "transformer", "base": spec.kind, "variant": "dev" if spec.kind == "flux" else "normal",
                   "dims": {"in_channels": config["in_channels"]}}  # fmt: skip
    else:
        fields |= _describe(module, spec.kind) | {"dims": _dims(module)}
    if path.suffix == ".gguf":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path, state, spec.form, arch=spec.kind, config=config)
        dtype = {"F16": "float16", "BF16": "bfloat16"}.get(spec.form)
        return ctx.gguf_entry(path, dtype=dtype, quant=spec.form, **fields)
    packed = packed_state(state, spec.form, prefix=prefix)
    write_safetensors(packed, path, metadata={CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True)})
    quant = None if spec.form == "bfloat16" else spec.form
    return ctx.file_entry(path, dtype=spec.form.removeprefix("scaled_"), quant=quant, **fields)


def _llama_t5_gguf(ctx: _Context, spec: _Spec, module: torch.nn.Module, config: dict[str, Any]) -> DemoEntry:
    """The T5 as a city96 T5 GGUF: llama.cpp's names, its numbers in ``t5encoder.*``, no config."""
    path = ctx.root / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_llama_t5_gguf(path, module, spec.form)
    return ctx.gguf_entry(
        path, name=spec.name, layout=spec.layout, class_name=type(module).__name__, prefix="", config=config,
        quant=spec.form, dims=_dims(module), **_describe(module, spec.kind),
    )  # fmt: skip


def _folder(ctx: _Context, spec: _Spec) -> DemoEntry:
    module = ctx.component(spec.family, spec.kind)
    variants = ("fp16",) if spec.name == "sd15-unet-folder" else ()
    dtype = torch.float32 if variants else torch.float16  # published folders: float32 + an fp16 variant
    path = save_component_folder(module, ctx.root / spec.path, dtype=dtype, variants=variants)
    return ctx.folder_entry(
        path,
        name=spec.name,
        **_describe(module, spec.kind),
        format="diffusers",
        layout="diffusers",
        class_name=type(module).__name__,
        config=component_config(module),
        dtype=str(dtype).removeprefix("torch."),
        weights_variants=variants,
        dims=_dims(module),
    )


def _tokenizer(ctx: _Context, spec: _Spec) -> DemoEntry:
    if spec.kind == "t5":
        path, class_name = save_t5_tokenizer(ctx.root / spec.path), "T5Tokenizer"
    else:
        path, class_name = save_clip_tokenizer(ctx.root / spec.path), "CLIPTokenizer"
    fields = {"type": "tokenizer", "format": "tokenizer", "layout": "diffusers", "class_name": class_name}
    return ctx.folder_entry(path, name=spec.name, base=None, encoder=spec.kind, **fields)


def _lora(ctx: _Context, spec: _Spec) -> DemoEntry:
    base: Any = spec.kind
    target = ctx.root / spec.path
    if spec.layout == "kohya":
        path = save_kohya_lora(target, base, seed=ctx.seed)
    elif spec.layout == "peft":
        path = save_peft_lora(target, base, seed=ctx.seed)
    else:
        path = save_lycoris(target, spec.layout, seed=ctx.seed)  # type: ignore[arg-type]
    return ctx.file_entry(
        path,
        name=spec.name,
        type="lora",
        base=base,
        layout=spec.layout,
        components=_LORA_TARGETS[base] if spec.layout in ("kohya", "peft") else ("unet",),
        dtype="float16",
        dims={"rank": DEFAULT_RANK},
        trigger_words=(TRIGGER_WORD,) if spec.layout != "peft" else (),
    )


def _embedding(ctx: _Context, spec: _Spec) -> DemoEntry:
    base: Any = spec.kind
    layout: Any = spec.layout
    path = save_embedding(ctx.root / spec.path, layout, base=base, seed=ctx.seed)
    widths = _EMBEDDING_WIDTHS[base]
    return ctx.file_entry(
        path,
        name=spec.name,
        type="textual_inversion",
        base=base,
        layout=spec.layout,
        components=tuple(widths),
        dtype="float32",
        dims={"vectors": 2, **{f"{k}_width": v for k, v in widths.items()}},
        token=DEFAULT_TOKEN if spec.layout == "diffusers" else None,
    )


# ----------------------------------------------------------------------------------------- the table


def _packed_specs() -> tuple[_Spec, ...]:
    """The forms users download (extras): a transformer-only Flux and SD3 beside the set's own T5,
    CLIP-L, CLIP-G and 16-channel VAE files (the parts that complete them); fp8, e5m2 and scaled fp8
    Flux, SD3 and SDXL; fp8 and scaled fp8 T5; a Q8_0 GGUF T5 in llama.cpp's names; GGUF Flux and SD3
    in every type."""
    specs = [_Spec(f"{base}-transformer", f"transformer/tiny-{base}.safetensors", _packed, base,
                   family="transformer", layout="diffusers", extra=True, form="bfloat16")
             for base in ("flux", "sd3")]  # fmt: skip
    for base, family, layout in (("flux", "transformer", "diffusers"), ("sd3", "transformer", "diffusers"),
                                 ("sdxl", "unet", "original")):  # fmt: skip
        folder = "unet" if family == "unet" else "transformer"
        for form, tag in (("float8_e4m3fn", "fp8-e4m3fn"), ("float8_e5m2", "fp8-e5m2"),
                          ("scaled_float8_e4m3fn", "fp8-scaled")):  # fmt: skip
            specs.append(_Spec(f"{base}-{family}-{tag}", f"{folder}/tiny-{base}-{tag}.safetensors", _packed, base,
                               family=family, layout=layout, prefix="", extra=True, form=form))  # fmt: skip
    for form, tag in (("float8_e4m3fn", "fp8-e4m3fn"), ("scaled_float8_e4m3fn", "fp8-scaled")):
        specs.append(_Spec(f"t5-{tag}", f"clip/tiny-t5-{tag}.safetensors", _packed, "t5", family="encoder",
                           layout="diffusers", prefix="", extra=True, form=form))  # fmt: skip
    # city96's T5 GGUFs: llama.cpp's names (``enc.blk.0.attn_q``), no modelkeeper.config
    specs.append(_Spec("t5-q8_0", "clip/tiny-t5-Q8_0.gguf", _packed, "t5", family="encoder", prefix="",
                       extra=True, form="Q8_0"))  # fmt: skip
    for base in ("flux", "sd3"):
        for qtype in GGUF_TYPES:
            specs.append(_Spec(f"{base}-transformer-{qtype.lower()}", f"transformer/tiny-{base}-{qtype}.gguf",
                               _packed, base, family="transformer", layout="diffusers", extra=True, form=qtype))  # fmt: skip
    return tuple(specs)


_PACKED = _packed_specs()
#: The names of the packed-format entries (written with ``extras`` or ``only``).
PACKED_ENTRY_NAMES = tuple(spec.name for spec in _PACKED)

_SPECS: tuple[_Spec, ...] = (
    _Spec("sd15-checkpoint", "checkpoints/tiny-sd15.safetensors", _checkpoint, "sd1"),
    _Spec("sdxl-checkpoint", "checkpoints/tiny-sdxl.safetensors", _checkpoint, "sdxl"),
    _Spec("sd15-inpaint-checkpoint", "checkpoints/tiny-sd15-inpaint.safetensors", _checkpoint, "sd1_inpaint",
          extra=True),
    _Spec("sd2-checkpoint", "checkpoints/tiny-sd2-v.safetensors", _checkpoint, "sd2", extra=True),
    _Spec("sd15-unet", "unet/tiny-sd15-unet.safetensors", _file, "sd1", family="unet", layout="diffusers"),
    _Spec("sd15-inpaint-unet", "unet/tiny-sd15-inpaint-unet.safetensors", _file, "sd1_inpaint",
          family="unet"),
    _Spec("sd2-unet", "unet/tiny-sd2-unet.safetensors", _file, "sd2", family="unet", prefix=""),
    _Spec("sdxl-unet", "unet/tiny-sdxl-unet.safetensors", _file, "sdxl", family="unet", prefix="",
          metadata=False),
    _Spec("sdxl-refiner-unet", "unet/tiny-sdxl-refiner-unet.safetensors", _file, "sdxl_refiner",
          family="unet"),
    _Spec("sd15-vae", "vae/tiny-sd15-vae.safetensors", _file, "sd1", family="vae", prefix="", metadata=False),
    _Spec("sdxl-vae", "vae/tiny-sdxl-vae.safetensors", _file, "sdxl", family="vae", layout="diffusers"),
    _Spec("flux-vae", "vae/tiny-flux-vae.safetensors", _file, "flux", family="vae", prefix=""),
    _Spec("clip-l", "clip/tiny-clip-l.safetensors", _file, "clip_l", family="encoder"),
    _Spec("clip-g", "clip/tiny-clip-g.safetensors", _file, "clip_g", family="encoder"),
    _Spec("t5", "clip/tiny-t5.safetensors", _file, "t5", family="encoder", layout="diffusers"),
    _Spec("sd15-pipeline", "diffusers/tiny-sd15", _pipeline, "sd1"),
    _Spec("sdxl-pipeline", "diffusers/tiny-sdxl", _pipeline, "sdxl"),
    _Spec("sd2-pipeline", "diffusers/tiny-sd2-v", _pipeline, "sd2", extra=True),
    _Spec("sd15-unet-folder", "diffusers/tiny-sd15-unet", _folder, "sd1", family="unet"),
    _Spec("flux-vae-folder", "diffusers/tiny-flux-vae", _folder, "flux", family="vae"),
    _Spec("t5-folder", "diffusers/tiny-t5", _folder, "t5", family="encoder"),
    _Spec("clip-tokenizer", "tokenizers/clip", _tokenizer, "clip_l"),
    _Spec("t5-tokenizer", "tokenizers/t5", _tokenizer, "t5"),
    _Spec("sd15-lora-kohya", "loras/tiny-sd15-kohya.safetensors", _lora, "sd1", layout="kohya"),
    _Spec("sd15-lora-peft", "loras/tiny-sd15-peft.safetensors", _lora, "sd1", layout="peft"),
    _Spec("sd15-loha", "loras/tiny-sd15-loha.safetensors", _lora, "sd1", layout="loha"),
    _Spec("sd15-lokr", "loras/tiny-sd15-lokr.safetensors", _lora, "sd1", layout="lokr"),
    _Spec("sdxl-lora-kohya", "loras/tiny-sdxl-kohya.safetensors", _lora, "sdxl", layout="kohya"),
    _Spec("sdxl-lora-peft", "loras/tiny-sdxl-peft.safetensors", _lora, "sdxl", layout="peft"),
    _Spec("sd15-embedding-a1111", "embeddings/tiny-sd15-a1111.safetensors", _embedding, "sd1",
          layout="a1111"),
    _Spec("sd15-embedding-diffusers", "embeddings/tiny-sd15-diffusers.safetensors", _embedding, "sd1",
          layout="diffusers"),
    _Spec("sd2-embedding-a1111", "embeddings/tiny-sd2-a1111.safetensors", _embedding, "sd2", layout="a1111"),
    _Spec("sdxl-embedding", "embeddings/tiny-sdxl.safetensors", _embedding, "sdxl", layout="sdxl"),
    *_PACKED,
)  # fmt: skip


def demo_entry_names(*, extras: bool = False) -> list[str]:
    """The names of the entries :func:`write_demo_models` writes (with ``extras``, the optional ones too)."""
    return [spec.name for spec in _SPECS if extras or not spec.extra]


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

    ``only`` restricts it to some entry names (see :func:`demo_entry_names`; extras included); ``extras``
    adds the optional entries (an SD2 v-prediction pipeline and checkpoint, an SD1 inpainting
    checkpoint). ``progress`` is called with one line per entry written. The same ``seed`` gives the
    same bytes.
    """
    specs = [s for s in _SPECS if extras or only is not None or not s.extra]
    if only is not None:
        unknown = set(only) - {s.name for s in specs}
        if unknown:
            raise ValueError(f"unknown demo entries: {sorted(unknown)}")
        specs = [s for s in specs if s.name in only]
    root.mkdir(parents=True, exist_ok=True)
    ctx = _Context(root=root, seed=seed)
    entries: list[DemoEntry] = []
    with _one_torch_thread():
        for spec in specs:
            entry = spec.write(ctx, spec)
            entries.append(entry)
            if progress is not None:
                progress(
                    f"{entry.path}  ({entry.type}, {entry.base or '-'}, {entry.size_bytes / 1e6:.1f} MB)"
                )
    manifest = DemoManifest(root=root, entries=tuple(entries), seed=seed)
    manifest.write()
    return manifest


__all__ = ["PACKED_ENTRY_NAMES", "Progress", "demo_entry_names", "write_demo_models"]
