"""The tiny tokenizers load offline from folders with the transformers auto classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

from modelkeeper.testing import (
    CLIP_VOCAB_SIZE,
    T5_VOCAB_SIZE,
    DemoManifest,
    make_clip_tokenizer,
    save_clip_tokenizer,
    save_t5_tokenizer,
)
from tests.testing.conftest import GROUP

pytestmark = GROUP

PROMPT = "A photo of a cat, 日本語 ünïcødé 🐱 — 12.5% <weird>!"


def test_clip_tokenizer_folder(tmp_path: Path) -> None:
    folder = save_clip_tokenizer(tmp_path / "clip")
    names = {p.name for p in folder.iterdir()}
    assert {
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == CLIP_VOCAB_SIZE
    assert vocab["<|endoftext|>"] == CLIP_VOCAB_SIZE - 1 and vocab["<|startoftext|>"] == CLIP_VOCAB_SIZE - 2
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == CLIP_VOCAB_SIZE
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Byte-level: every character of any prompt is in the vocabulary, nothing is unknown.
    assert tokenizer.eos_token_id not in ids[1:-1]
    padded = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    assert (
        tokenizer.decode(tokenizer("a photo of a cat").input_ids, skip_special_tokens=True)
        == "a photo of a cat"
    )


def test_clip_tokenizer_from_vocab_and_merges_only(tmp_path: Path) -> None:
    full = save_clip_tokenizer(tmp_path / "full")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(full / name, bare / name)
    expected = make_clip_tokenizer()(PROMPT).input_ids
    assert CLIPTokenizer.from_pretrained(bare, local_files_only=True)(PROMPT).input_ids == expected
    assert AutoTokenizer.from_pretrained(bare, local_files_only=True)(PROMPT).input_ids == expected


def test_t5_tokenizer_folder(tmp_path: Path) -> None:
    folder = save_t5_tokenizer(tmp_path / "t5")
    for loader in (AutoTokenizer, T5TokenizerFast):
        tokenizer = loader.from_pretrained(folder, local_files_only=True)
        assert len(tokenizer) == T5_VOCAB_SIZE
        ids = tokenizer("A photo of a cat").input_ids
        assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == "A photo of a cat"
        assert tokenizer(PROMPT).input_ids[-1] == 1  # unknown characters become <unk>, as in T5


def test_demo_tokenizers_load(demo: DemoManifest) -> None:
    for entry in demo.select(type="tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(demo.root / entry.path, local_files_only=True)
        assert type(tokenizer).__name__ == entry.class_name
