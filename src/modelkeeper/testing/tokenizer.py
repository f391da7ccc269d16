"""Tiny tokenizers that load offline: a byte-level CLIP BPE and a T5 unigram.

The CLIP tokenizer has the real structure (256 byte symbols, the same with ``</w>``, learned merges,
then ``<|startoftext|>`` and ``<|endoftext|>``), so any prompt tokenizes; its merges are learned here
from a few hundred words of prompt text. The T5 tokenizer is a small SentencePiece-style unigram;
characters it does not know become ``<unk>``, as with the real one.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any, cast

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_VOCAB_SIZE = 600
CLIP_MODEL_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

_PROMPT_TEXT = """
a photo of a cat sitting on a chair, high quality, detailed, sharp focus, studio lighting
a portrait of a woman with long hair, oil painting, masterpiece, best quality, trending on artstation
a landscape with mountains and a lake at sunset, cinematic, dramatic lighting, wide angle
a dog running in the park, photograph, depth of field, bokeh, natural light, the morning
an astronaut riding a horse on the moon, digital art, concept art, illustration, fantasy
a city street at night with neon lights and rain, cyberpunk, reflections, highly detailed
a bowl of fruit on a wooden table, still life, soft shadows, realistic, the painting of the year
a castle on a hill surrounded by forest, matte painting, epic, beautiful, intricate details
close up of a flower with water drops, macro photography, vibrant colors, green leaves
the old man reading a book in the library, warm light, film grain, analog photo, kodak
low quality, blurry, worst quality, bad anatomy, extra fingers, watermark, text, signature
a red car parked in front of the house, summer, blue sky, clouds, street photography
a cute robot playing with a kitten, pixar style, render, octane, unreal engine, toy
the ocean waves crashing against the rocks, long exposure, seascape, stormy weather
"""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP map from bytes to printable characters, so byte-level BPE never meets a space."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _learn_merges(text: str, count: int, taken: set[str]) -> list[tuple[str, str]]:
    """Plain byte-pair-encoding training on ``text``: ``count`` merges, most frequent pair first."""
    byte_map = bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    corpus = {
        (*chars[:-1], chars[-1] + "</w>"): n
        for word, n in words.items()
        for chars in [[byte_map[b] for b in word.encode()]]
    }
    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in corpus.items():
            for pair in itertools.pairwise(symbols):
                if pair not in banned:
                    pairs[pair] += n
        if not pairs:
            raise RuntimeError("the prompt text is too short for the merges the vocabulary needs")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if best[0] + best[1] in taken:
            banned.add(best)
            continue
        merges.append(best)
        taken.add(best[0] + best[1])
        corpus = {_apply_merge(symbols, best): n for symbols, n in corpus.items()}
    return merges


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


@cache
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The tiny CLIP vocabulary (``CLIP_VOCAB_SIZE`` entries, CLIP's order) and its merges."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(_PROMPT_TEXT, CLIP_VOCAB_SIZE - len(tokens) - 2, set(tokens))
    tokens += [a + b for a, b in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    assert len(tokens) == CLIP_VOCAB_SIZE == len(set(tokens))
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


def make_clip_tokenizer() -> CLIPTokenizer:
    """A tiny byte-level ``CLIPTokenizer`` (vocab ``CLIP_VOCAB_SIZE``, ``model_max_length`` 77)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=cast(Any, list(merges)),  # (left, right) pairs; transformers' annotation says str
        model_max_length=CLIP_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def save_clip_tokenizer(folder: Path, tokenizer: CLIPTokenizer | None = None) -> Path:
    """Write a CLIP tokenizer (default: the tiny one) to ``folder``: ``vocab.json``, ``merges.txt``,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, as published CLIP
    tokenizers have them."""
    tokenizer = tokenizer or make_clip_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    special = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "unk_token": str(tokenizer.unk_token),
        "pad_token": str(tokenizer.pad_token),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return folder


_T5_WORD_TEXT = """
the a an of and in on with at to for is photo portrait painting landscape cat dog woman man city night
light high quality detailed style art red blue green old young small big house street sky water tree
flower car book
"""
_T5_WORDS = tuple(_T5_WORD_TEXT.split())
_T5_PUNCTUATION = list(".,!?'\"-:;()/&%#+=*")


@cache
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """The tiny T5 unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>``, then pieces with log-probabilities."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -4.0 - i / 100) for i, w in enumerate(_T5_WORDS)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("▁" + c, -7.0) for c in letters]
    singles = letters + [c.upper() for c in letters] + [str(d) for d in range(10)] + _T5_PUNCTUATION
    pieces += [(c, -9.0) for c in singles]
    unique: dict[str, float] = {}
    for piece, score in pieces:
        unique.setdefault(piece, score)
    return tuple(unique.items())


T5_VOCAB_SIZE = len(t5_vocab())
T5_MODEL_MAX_LENGTH = 512


def make_t5_tokenizer() -> T5Tokenizer:
    """A tiny T5 tokenizer (unigram, ``T5_VOCAB_SIZE`` pieces, no sentinel tokens)."""
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=T5_MODEL_MAX_LENGTH)


def save_t5_tokenizer(folder: Path, tokenizer: T5Tokenizer | None = None) -> Path:
    """Write a T5 tokenizer (default: the tiny one) to ``folder`` (``tokenizer.json``, its config)."""
    folder.mkdir(parents=True, exist_ok=True)
    (tokenizer or make_t5_tokenizer()).save_pretrained(folder)
    return folder
