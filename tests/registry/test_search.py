"""Search matches what users type: underscores, case, partial words, file names; the filters
accept the words users use and refuse unknown ones with the list of valid values."""

from __future__ import annotations

import pytest

from modelkeeper.registry.errors import InvalidFilter
from modelkeeper.registry.store import Registry
from modelkeeper.registry.vocabulary import VALUES, normalize


def _names(registry: Registry, **filters: str) -> set[str]:
    return {m.name for m in registry.search(limit=100, **filters).items}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("clip_l", "clip_l"),  # an underscore is a separator, not a wildcard to drop
        ("CLIP-L", "clip_l"),  # case and separators do not matter
        ("vae_ft", "vae-ft-mse"),
        ("ftmse", "vae-ft-mse"),  # the word without its separators
        ("flux1_dev", "flux1-dev"),
        ("easyneg", "easynegative"),  # a partial word
        ("easynegative.safetensors", "easynegative"),  # the file name
        ("stable-diffusion-v1-5", "stable-diffusion-v1-5"),
    ],
)
def test_query_finds_what_users_type(registry: Registry, query: str, name: str) -> None:
    assert name in _names(registry, query=query)


def test_query_matches_folders_and_narrows_by_every_word(registry: Registry) -> None:
    assert _names(registry, query="loras") == {"style"}  # the folder of its file
    assert _names(registry, query="vae mse") == {"vae-ft-mse"}
    assert _names(registry, query="vae_nothing") == set()
    assert _names(registry, query="100%") == set()  # LIKE wildcards are taken literally


@pytest.mark.parametrize(
    ("field", "typed", "stored"),
    [
        ("type", "checkpoint", "main"),
        ("type", "Checkpoints", "main"),
        ("type", "loras", "lora"),
        ("type", "LyCORIS", "lora"),
        ("type", "embeddings", "textual_inversion"),
        ("type", "text-encoder", "text_encoder"),
        ("type", "VAE", "vae"),
        ("base", "SDXL", "sdxl"),
        ("base", "sd15", "sd1"),
        ("base", "SD1.5", "sd1"),
        ("base", "sd-2.1", "sd2"),
        ("base", "SD3.5", "sd3"),
        ("base", "Flux.1", "flux"),
        ("format", "ckpt", "pickle"),
        ("status", "MISSING", "missing"),
    ],
)
def test_filter_words(field: str, typed: str, stored: str) -> None:
    assert normalize(field, typed) == stored


def test_every_stored_value_stands_for_itself() -> None:
    for field, values in VALUES.items():
        for value in values:
            assert normalize(field, value) == value


def test_filters_accept_users_words_in_the_search(registry: Registry) -> None:
    assert _names(registry, type="checkpoints") == _names(registry, type="main")
    assert _names(registry, type="loras") == {"style"}
    assert _names(registry, base="SD1.5") == _names(registry, base="sd1") != set()


@pytest.mark.parametrize(("field", "value"), [("type", "checkpointz"), ("base", "sd9"), ("format", "zip")])
def test_unknown_filter_values_are_refused_with_the_valid_ones(
    registry: Registry, field: str, value: str
) -> None:
    with pytest.raises(InvalidFilter) as info:
        registry.search(**{field: value})  # type: ignore[arg-type]
    assert info.value.details["field"] == field
    assert info.value.details["valid"] == list(VALUES[field])
    assert field in str(info.value) and VALUES[field][0] in str(info.value)


def test_a_base_filter_lists_the_models_that_fit_that_base(registry: Registry) -> None:
    """``--base sdxl`` means usable with SDXL: stored under it, or fitting it. The single-file VAE
    (shapes shared by the SD family, stored sd1) and CLIP-L (base "any") fit SDXL too."""
    vae = registry.resolve("vae-ft-mse")
    assert vae.base == "sd1" and "sdxl" in vae.identification.compatible_bases
    assert _names(registry, type="vae", base="sdxl") == {"vae-ft-mse"}
    assert _names(registry, base="SDXL") == {"vae-ft-mse", "clip_l"}
    assert {"vae-ft-mse", "clip_l", "style", "easynegative"} <= _names(registry, base="sd1.5")
    assert "flux1-dev" not in _names(registry, base="sd1")
    assert _names(registry, base="flux") == {"flux1-dev", "clip_l"}
    assert _names(registry, base="any") == {"clip_l"}  # the stored base still matches
    page = registry.search(base="sdxl", limit=1)
    assert page.total == 2 and len(page.items) == 1  # counted as listed
