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
