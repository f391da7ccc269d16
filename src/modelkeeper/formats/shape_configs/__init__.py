"""The config a single file's tensor shapes imply, over the known config of its base.

A single file carries no config unless it was written with one (``modelkeeper.config`` metadata);
the registry then names the known config of the file's base (``sdxl/unet``). That is right for the
published files, and wrong for pruned or shrunk variants of them (fewer levels, fewer layers per
level, shallower attention, another width): their shapes do not fit it. ``fit_config`` reads the
architecture from the shapes of the file's tensors (keys relative to the component's prefix, in the
layout the worker detected) and writes it over the given config: the fields shapes decide are
replaced, every other field (schedules, activations, scaling factors) is kept. A file that fits
its config gets it back unchanged.

What shapes decide, per layout (the names of the worker's layout rules, ``worker.convert``):

- UNet (``unet/original``, ``unet/diffusers``): levels and their widths (``block_out_channels``), the
  block types (attention or not per level), ``layers_per_block``, ``transformer_layers_per_block``,
  the mid block, ``in_channels``, ``out_channels``, ``cross_attention_dim``, ``use_linear_projection``,
  the time embedding width and the added (SDXL) embedding's input width.
- VAE (``vae/original``, ``vae/diffusers``): levels and widths, ``layers_per_block``, ``in_channels``,
  ``out_channels``, ``latent_channels``, the quant convolutions, the mid block's attention.
- CLIP (``clip/transformers``, ``clip/openclip``): ``hidden_size``, ``intermediate_size``,
  ``num_hidden_layers``, ``max_position_embeddings``, ``vocab_size``, ``projection_dim``.
- T5 (``t5/transformers``): ``d_model``, ``num_layers``, ``num_heads`` (from the relative attention
  bias), ``d_kv``, ``d_ff``, ``vocab_size``, the relative attention buckets, gated or plain MLP.
- Flux and SD3 transformers (``transformer/diffusers``, ``flux/original``, ``sd3/original``): the
  class, the number of (single) blocks, the width as heads of the query norm's width (Flux, SD 3.5;
  else the config's head width), in and out channels, the patch, the text and pooled widths, the
  guidance embedding (Flux), the position grid, the query norm and the blocks with a second
  attention (SD 3.5). A Flux with fewer blocks (Flux lite) or an SD 3.5 Large loads with its base's
  known config fitted to its shapes.

What shapes cannot decide is kept from the config, and made consistent with the widths where the
kept value cannot build them: a number of attention heads that does not divide a width becomes one
of 64-wide heads (the width of every Stable Diffusion model), else the largest that divides it;
``norm_num_groups`` that does not divide every width becomes the largest divisor that does.

One module per family reads its layouts (``unet``, ``vae``, ``text``, ``transformer``, each with
its ``READERS``); ``read`` holds what they share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelkeeper.formats.shape_configs import text, transformer, unet, vae
from modelkeeper.formats.shape_configs.read import Readers, Shapes, plain

__all__ = ["SHAPE_LAYOUTS", "Fitted", "fit_config"]

_READERS: Readers = {**unet.READERS, **vae.READERS, **text.READERS, **transformer.READERS}

#: The layouts whose configs shapes decide (the worker's layout rule names).
SHAPE_LAYOUTS = tuple(_READERS)

_MISSING = object()


@dataclass(frozen=True)
class Fitted:
    """``config`` fitted to a file's shapes; ``changed`` names the fields that differ from the
    config given (empty when it fitted as it was)."""

    config: dict[str, Any]
    changed: tuple[str, ...]


def fit_config(layout: str, shapes: Shapes, config: Mapping[str, Any] | None) -> Fitted:
    """``config`` (``None``: none known) with the fields ``shapes`` decide read from them.

    ``layout`` is a layout rule's name (``SHAPE_LAYOUTS``; any other is returned unchanged) and
    ``shapes`` maps the component's keys, its prefix removed, to their shapes. Shapes that lack
    the keys a field is read from leave that field as it was: the load's own checks name what is
    wrong with such a file.
    """
    base = dict(config or {})
    if layout not in _READERS:
        return Fitted(base, ())
    reader, defaults = _READERS[layout]
    found = reader(shapes, base)
    changed = tuple(
        sorted(k for k, v in found.items() if plain(base.get(k, defaults.get(k, _MISSING))) != plain(v))
    )
    return Fitted({**base, **{k: found[k] for k in changed}}, changed)
