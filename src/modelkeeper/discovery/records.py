"""What discovery knows about one model file or folder.

The vocabulary (formats, types, bases, variants, encoders, LoRA formats, layouts) is a set of
string enums; an :class:`Identification` is the answer of the identification engine and is what
the registry stores for each model.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelFormat(StrEnum):
    SAFETENSORS = "safetensors"
    PICKLE = "pickle"  # .ckpt / .pt / .pth / .bin, read only in the sandbox
    GGUF = "gguf"  # quantized blocks, loaded packed (the worker decodes them layer by layer)
    DIFFUSERS = "diffusers"  # a folder: a pipeline (model_index.json) or one component (config.json)


class ModelType(StrEnum):
    MAIN = "main"
    UNET = "unet"
    TRANSFORMER = "transformer"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    LORA = "lora"
    CONTROLNET = "controlnet"
    TEXTUAL_INVERSION = "textual_inversion"
    UNKNOWN = "unknown"


class Base(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"
    SD3 = "sd3"
    FLUX = "flux"
    ANY = "any"  # works with several bases (a CLIP-L text encoder, say); see compatible_bases
    UNKNOWN = "unknown"


class Variant(StrEnum):
    NORMAL = "normal"
    INPAINT = "inpaint"
    INSTRUCT_PIX2PIX = "instruct_pix2pix"
    V_PREDICTION = "v_prediction"
    DEV = "dev"
    SCHNELL = "schnell"
    FILL = "fill"
    DEPTH = "depth"
    MEDIUM = "medium"
    LARGE = "large"


class EncoderKind(StrEnum):
    CLIP_L = "clip_l"
    CLIP_G = "clip_g"
    CLIP_H = "clip_h"
    T5_XXL = "t5_xxl"


class LoraFormat(StrEnum):
    KOHYA = "kohya"
    LOHA = "loha"  # LyCORIS LoHa
    LOKR = "lokr"  # LyCORIS LoKr
    DIFFUSERS = "diffusers"
    PEFT = "peft"


class Layout(StrEnum):
    """Key layout, as a worker needs it (see protocol ``KeyLayout``)."""

    ORIGINAL = "original"  # LDM / SGM / BFL / MMDiT / OpenCLIP names of single-file checkpoints
    DIFFUSERS = "diffusers"  # diffusers and transformers names
    NONE = "none"  # LoRAs and embeddings: their own naming, see lora_format


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentInfo(_Record):
    """One component of a model: a UNet inside a checkpoint, a pipeline's ``vae`` folder..."""

    name: str = Field(description="Slot: unet, transformer, vae, text_encoder, text_encoder_2, ...")
    kind: ModelType
    layout: Layout
    prefix: str = Field("", description="Key prefix inside a single file ('' for the whole file).")
    subfolder: str | None = Field(None, description="Folder inside a diffusers pipeline.")
    base: Base = Base.UNKNOWN
    encoder: EncoderKind | None = None
    rule: str
    tensor_count: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = Field(default_factory=dict, description="dtype -> tensor count")
    content_id: str | None = Field(None, description="BLAKE3 over the component's tensors (after hashing).")
    config: dict[str, Any] | None = Field(None, description="config.json of a diffusers component.")


class LoraInfo(_Record):
    format: LoraFormat
    rank: int | None = None
    alpha: float | None = None
    targets: list[str] = Field(default_factory=list, description="unet, transformer, text_encoder...")
    modules: int = 0


class Identification(_Record):
    """The answer for one model file or folder."""

    format: ModelFormat
    type: ModelType = ModelType.UNKNOWN
    base: Base = Base.UNKNOWN
    variant: str = Variant.NORMAL.value
    layout: Layout = Layout.NONE
    encoder: EncoderKind | None = None
    lora: LoraInfo | None = None
    components: list[ComponentInfo] = Field(default_factory=list)
    compatible_bases: list[Base] = Field(default_factory=list)
    rule: str = Field(description="Name of the rule that decided the type.")
    rules: dict[str, str] = Field(default_factory=dict, description="type / base / variant -> rule name")
    confidence: float = Field(ge=0.0, le=1.0)
    loadable: bool = True
    tensor_count: int = 0
    parameters: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = Field(default_factory=dict)
    quant: str | None = Field(
        None,
        description="Stored form of the weights when not plain floats: the dominant GGUF type (Q8_0, "
        "Q4_K, F16...), float8_e4m3fn, float8_e5m2, or scaled_float8_e4m3fn (ComfyUI's scaled fp8).",
    )
    weight_variant: str | None = Field(None, description="diffusers weight variant of a folder (fp16...).")
    hints: list[str] = Field(default_factory=list, description="Folder conventions that applied.")
    hint_conflicts: list[str] = Field(default_factory=list, description="Hints the headers contradicted.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="What the file and its sidecars say: modelspec, kohya, civitai."
    )
    evidence: dict[str, Any] = Field(default_factory=dict, description="Measured dims the rules used.")
