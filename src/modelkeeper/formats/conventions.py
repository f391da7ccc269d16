"""Names every reader of model files agrees on: the orchestrator, the workers, the fixture factory."""

from __future__ import annotations

#: File suffixes read as safetensors.
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

#: Stems of the safetensors weight file of a diffusers or transformers component folder
#: (``diffusion_pytorch_model[.fp16].safetensors``, ``model.safetensors``), in order of preference.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")

#: Stems of any weight file of a component folder, pickles included (transformers' ``pytorch_model.bin``):
#: what discovery recognises, in order of preference.
FOLDER_WEIGHT_STEMS = (*WEIGHT_STEMS, "pytorch_model")

CONFIG_METADATA_KEY = "modelkeeper.config"
"""safetensors ``__metadata__`` entry holding JSON: for one component, the ``config.json`` its diffusers /
transformers folder would hold; for a full checkpoint, ``{"_class_name": <pipeline class>, "unet": {...},
"vae": {...}, "text_encoder": {...}[, "text_encoder_2": {...}]}``."""

# Key prefixes of the components inside a single-file checkpoint in the original layout (LDM / SGM, as
# the Stability releases and A1111 write it; ComfyUI's ``text_encoders.*`` for SD3 / Flux files): each
# component's tensors sit behind its prefix, under the original repository's own names.

LDM_DENOISER_PREFIX = "model.diffusion_model."
"""The denoiser: the UNet of SD1 / SD2 / SDXL (LDM / SGM names), the transformer of SD3 / Flux files."""

LDM_VAE_PREFIX = "first_stage_model."
"""The VAE (LDM ``first_stage_model``)."""

LDM_TEXT_ENCODER_PREFIX = "cond_stage_model."
"""The text encoder of SD1 / SD2 (LDM ``cond_stage_model``): CLIP-L under ``transformer.`` (transformers'
names), OpenCLIP-H under ``model.`` (open_clip names)."""

LDM_CONTROLNET_PREFIX = "control_model."
"""An original-layout ControlNet (LDM ``control_model``)."""

SGM_EMBEDDER_0_PREFIX = "conditioner.embedders.0."
"""SDXL's first text encoder (SGM conditioner): CLIP-L under ``transformer.`` in the base model; in the
refiner, whose only encoder it is, OpenCLIP-G under ``model.``."""

SGM_EMBEDDER_1_PREFIX = "conditioner.embedders.1."
"""SDXL's second text encoder (SGM conditioner): OpenCLIP-G under ``model.``."""

COMFY_CLIP_L_PREFIX = "text_encoders.clip_l."
"""CLIP-L in a ComfyUI all-in-one SD3 / Flux file (transformers' names under ``transformer.``)."""

COMFY_CLIP_G_PREFIX = "text_encoders.clip_g."
"""CLIP-G in a ComfyUI all-in-one SD3 file (transformers' names under ``transformer.``)."""

COMFY_T5XXL_PREFIX = "text_encoders.t5xxl."
"""T5-XXL in a ComfyUI all-in-one SD3 / Flux file (transformers' names under ``transformer.``)."""

#: Folder under a model root where an install stages its downloads (partial and not yet verified
#: files): the installer writes there, discovery never enters it.
INSTALL_STAGING_DIR = ".modelkeeper-partial"

# safetensors ``__metadata__`` entries of a file that ``modelkeeper convert`` wrote from a pickle
# checkpoint: where it came from and what the scan knew of it.

CONVERTED_FROM_KEY = "modelkeeper.converted_from"
"""The name of the pickle checkpoint the file was converted from (``model.ckpt``)."""

CONVERTED_SHA256_KEY = "modelkeeper.converted_from_sha256"
"""The sha256 of that pickle checkpoint, as hex: the file a hash lookup knows."""

MODEL_TYPE_KEY = "modelkeeper.type"
"""The model's type as identification names it (``main``, ``unet``, ``vae``, ``lora``...)."""

MODEL_BASE_KEY = "modelkeeper.base"
"""The model's base as identification names it (``sd1``, ``sdxl``, ``flux``...)."""

MODEL_VARIANT_KEY = "modelkeeper.variant"
"""The model's variant as identification names it (``normal``, ``inpaint``, ``v_prediction``...)."""
