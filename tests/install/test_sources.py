"""Parsing sources: every accepted form, and the refusals (bad text, schemes, hostile names)."""

from __future__ import annotations

import pytest

from modelkeeper.install import (
    CivitaiSource,
    HubSource,
    InvalidSource,
    UnsafeSource,
    UrlSource,
    parse_source,
    redact_url,
)
from modelkeeper.install.sources import safe_relative


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", HubSource("org/name")),
        ("org/name@v1.0", HubSource("org/name", "v1.0")),
        ("org/name:unet", HubSource("org/name", None, "unet")),
        (
            "org/name@abc123:vae/diffusion_pytorch_model.safetensors",
            HubSource("org/name", "abc123", "vae/diffusion_pytorch_model.safetensors"),
        ),
        ("https://huggingface.co/org/name", HubSource("org/name")),
        (
            "https://huggingface.co/org/name/blob/main/model.safetensors",
            HubSource("org/name", "main", "model.safetensors"),
        ),
        ("https://huggingface.co/org/name/tree/dev/unet", HubSource("org/name", "dev", "unet")),
        (
            "http://127.0.0.1:8000/org/name/resolve/main/a.safetensors",
            HubSource("org/name", "main", "a.safetensors"),
        ),
        ("civitai:123", CivitaiSource(version_id=123)),
        ("https://civitai.com/models/12/some-slug", CivitaiSource(model_id=12)),
        ("https://civitai.com/models/12?modelVersionId=34", CivitaiSource(version_id=34, model_id=12)),
        ("https://civitai.com/api/download/models/34", CivitaiSource(version_id=34)),
        (
            "https://example.com/files/model.safetensors",
            UrlSource("https://example.com/files/model.safetensors"),
        ),
        ("http://example.com/m.ckpt", UrlSource("http://example.com/m.ckpt")),
    ],
)
def test_accepted_forms(text: str, expected: object) -> None:
    assert parse_source(text, hub_hosts={"127.0.0.1:8000"}) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "just-a-name",
        "org/na--me",
        "org/../x",
        "a/b/c",
        "civitai:abc",
        "https://civitai.com/images/5",
    ],
)
def test_invalid_sources_are_named(text: str) -> None:
    with pytest.raises(InvalidSource):
        parse_source(text)


@pytest.mark.parametrize("text", ["ftp://example.com/m.safetensors", "file:///etc/passwd", "javascript://x"])
def test_other_schemes_are_refused(text: str) -> None:
    with pytest.raises(UnsafeSource, match="only http and https"):
        parse_source(text)


@pytest.mark.parametrize(
    "name", ["../evil.safetensors", "a/../../b", "/etc/passwd", "C:\\x", "a\\b", "a//b", "./a", "", "a\x00b"]
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafeSource):
        safe_relative(name, what="listing")


def test_hostile_path_in_a_hub_source_is_refused() -> None:
    with pytest.raises(UnsafeSource):
        parse_source("org/name:../../etc/passwd")


def test_redact_url_hides_credentials() -> None:
    url = "https://user:secret@civitai.com/api/download/models/1?token=abc123&type=Model"
    shown = redact_url(url)
    assert "secret" not in shown and "abc123" not in shown
    assert shown == "https://civitai.com/api/download/models/1?token=%2A%2A%2A&type=Model"
    assert UrlSource(url).canonical() == shown


def test_a_diffusers_repo_listing_keeps_one_weight_form_per_folder() -> None:
    from modelkeeper.install.hub import select_files

    listing = [
        ".gitattributes", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "model_index.json",
        "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors", "samples/cat.png",
        "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]  # fmt: skip
    assert select_files(listing) == [
        "model_index.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/vocab.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",  # only a variant: kept
    ]  # fmt: skip
