"""The fixture factory: tiny but real diffusion models, made in code, for tests and demos.

Nothing is downloaded. Every model is a real diffusers / transformers module with seeded random
weights, shrunk everywhere except in the dimensions that identification discriminates on (UNet
cross-attention width and input channels, VAE latent channels, text-encoder width). The same seed
gives the same bytes.

- Components: :func:`make_unet`, :func:`make_vae`, :func:`make_text_encoder`, :func:`make_scheduler`,
  :func:`make_pipeline`, tokenizers :func:`make_clip_tokenizer` and :func:`make_t5_tokenizer`.
- Files: :func:`save_single_file` (diffusers or original layout, with or without the
  ``modelkeeper.config`` metadata), :func:`save_checkpoint` (full A1111/ComfyUI-style checkpoint),
  :func:`save_component_folder`, :func:`save_pipeline_folder`, LoRAs (:func:`save_kohya_lora`,
  :func:`save_peft_lora`, :func:`save_lycoris`) and embeddings (:func:`save_embedding`).
- Layout conversion diffusers -> original: :func:`unet_to_original`, :func:`vae_to_original`,
  :func:`clip_to_original`, :func:`clip_to_openclip` (exact inverses of diffusers' converters).
- The demo set: :func:`write_demo_models` writes everything and returns its :class:`DemoManifest`.
"""

from modelkeeper.testing.components import (
    DEFAULT_SEED,
    ENCODER_HIDDEN_SIZE,
    ENCODER_KINDS,
    TRANSFORMER_WIDTH,
    UNET_CROSS_ATTENTION_DIM,
    UNET_IN_CHANNELS,
    UNET_KINDS,
    VAE_KINDS,
    VAE_LATENT_CHANNELS,
    VAE_SCALE_FACTOR,
    Base,
    EncoderKind,
    TransformerKind,
    UNetKind,
    VaeKind,
    component_config,
    make_scheduler,
    make_text_encoder,
    make_transformer,
    make_unet,
    make_vae,
    state_dict_for_save,
    text_encoder_config,
    transformer_config,
    unet_config,
    vae_config,
)
from modelkeeper.testing.demo import demo_entry_names, write_demo_models
from modelkeeper.testing.embeddings import EmbeddingLayout, embedding_state_dict, save_embedding
from modelkeeper.testing.files import (
    CONFIG_METADATA_KEY,
    ORIGINAL_PREFIX,
    ComponentKind,
    Layout,
    PipelineBase,
    checkpoint_config,
    make_pipeline,
    save_checkpoint,
    save_component_folder,
    save_pipeline_folder,
    save_single_file,
    to_original_layout,
)
from modelkeeper.testing.loras import (
    DEFAULT_RANK,
    kohya_lora_state_dict,
    lycoris_state_dict,
    save_kohya_lora,
    save_lycoris,
    save_peft_lora,
)
from modelkeeper.testing.manifest import MANIFEST_NAME, DemoEntry, DemoManifest
from modelkeeper.testing.original_layout import (
    clip_to_openclip,
    clip_to_original,
    unet_to_original,
    vae_to_original,
)
from modelkeeper.testing.tokenizer import (
    CLIP_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    make_clip_tokenizer,
    make_t5_tokenizer,
    save_clip_tokenizer,
    save_t5_tokenizer,
)

__all__ = [
    "CLIP_VOCAB_SIZE",
    "CONFIG_METADATA_KEY",
    "DEFAULT_RANK",
    "DEFAULT_SEED",
    "ENCODER_HIDDEN_SIZE",
    "ENCODER_KINDS",
    "MANIFEST_NAME",
    "ORIGINAL_PREFIX",
    "T5_VOCAB_SIZE",
    "TRANSFORMER_WIDTH",
    "UNET_CROSS_ATTENTION_DIM",
    "UNET_IN_CHANNELS",
    "UNET_KINDS",
    "VAE_KINDS",
    "VAE_LATENT_CHANNELS",
    "VAE_SCALE_FACTOR",
    "Base",
    "ComponentKind",
    "DemoEntry",
    "DemoManifest",
    "EmbeddingLayout",
    "EncoderKind",
    "Layout",
    "PipelineBase",
    "TransformerKind",
    "UNetKind",
    "VaeKind",
    "checkpoint_config",
    "clip_to_openclip",
    "clip_to_original",
    "component_config",
    "demo_entry_names",
    "embedding_state_dict",
    "kohya_lora_state_dict",
    "lycoris_state_dict",
    "make_clip_tokenizer",
    "make_pipeline",
    "make_scheduler",
    "make_t5_tokenizer",
    "make_text_encoder",
    "make_transformer",
    "make_unet",
    "make_vae",
    "save_checkpoint",
    "save_clip_tokenizer",
    "save_component_folder",
    "save_embedding",
    "save_kohya_lora",
    "save_lycoris",
    "save_peft_lora",
    "save_pipeline_folder",
    "save_single_file",
    "save_t5_tokenizer",
    "state_dict_for_save",
    "text_encoder_config",
    "to_original_layout",
    "transformer_config",
    "unet_config",
    "unet_to_original",
    "vae_config",
    "vae_to_original",
    "write_demo_models",
]
