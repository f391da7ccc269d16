"""Rule table for textual-inversion embeddings.

Embeddings are tiny: one or two tensors of shape ``[tokens, width]`` (or ``[width]``) under
well-known names. The width is the text encoder's: 768 CLIP-L (sd1), 1024 OpenCLIP-H (sd2);
SDXL embeddings carry one tensor per encoder, ``clip_l`` (768) and ``clip_g`` (1280).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkeeper.discovery.records import Base
from modelkeeper.discovery.rules.engine import KeyPattern, keys


@dataclass(frozen=True)
class EmbeddingRule:
    name: str
    requires: tuple[KeyPattern, ...]  # each must match some key
    width_key: KeyPattern | None  # the key whose last dim is the width (None: base is fixed)
    base: Base | None = None
    max_tensors: int = 4
    confidence: float = 1.0


EMBEDDING_RULES: tuple[EmbeddingRule, ...] = (
    EmbeddingRule("embedding.sdxl", (keys(r"clip_l"), keys(r"clip_g")), None, Base.SDXL),
    EmbeddingRule(
        "embedding.a1111", (keys(r"string_to_param\..*"),), keys(r"string_to_param\..*"), max_tensors=8
    ),
    EmbeddingRule("embedding.emb_params", (keys(r"emb_params"),), keys(r"emb_params")),
    # diffusers' learned_embeds: {"<token>": tensor[width]}, one entry per learned token.
    EmbeddingRule("embedding.diffusers", (keys(r"<[^>\n]+>"),), keys(r"<[^>\n]+>"), confidence=0.9),
    EmbeddingRule("embedding.single_tensor", (keys(r".+"),), keys(r".+"), max_tensors=1, confidence=0.6),
)

#: Embedding width -> base.
EMBEDDING_WIDTHS: dict[int, Base] = {768: Base.SD1, 1024: Base.SD2}
