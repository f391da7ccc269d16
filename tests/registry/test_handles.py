"""Handles: every model has a short unique name to type; an ambiguous name lists each candidate."""

from __future__ import annotations

import pytest

from modelkeeper.registry.errors import AmbiguousReference
from modelkeeper.registry.handles import Named, assign
from modelkeeper.registry.store import Registry


def _handles(*models: Named) -> dict[str, str]:
    return assign(models)


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        # alone with its name: the name (spaces and URL-unsafe characters become "-")
        ([Named("m-1", "dreamshaper_8", "main", "checkpoints")], ["dreamshaper_8"]),
        ([Named("m-1", "My Model #2", "main", "checkpoints")], ["My-Model-2"]),
        # the demo's tiny-sdxl: a checkpoint, a diffusers folder, a UNet
        (
            [
                Named("m-1", "tiny-sdxl", "main", "checkpoints"),
                Named("m-2", "tiny-sdxl", "main", "diffusers"),
                Named("m-3", "tiny-sdxl", "unet", "unet"),
            ],
            ["tiny-sdxl@checkpoints", "tiny-sdxl@diffusers", "tiny-sdxl.unet"],
        ),
        # names compare without case
        (
            [Named("m-1", "Style", "lora", "loras"), Named("m-2", "style", "vae", "vae")],
            ["Style.lora", "style.vae"],
        ),
        # same type and folder name under two roots: type and folder do not help, the id does
        (
            [Named("m-aaaaaa1", "x", "lora", "loras"), Named("m-bbbbbb2", "x", "lora", "loras")],
            ["x~aaaaaa", "x~bbbbbb"],
        ),
        # type tells one apart, folders the two others ("a" also holds the LoRA: type and folder)
        (
            [
                Named("m-1", "x", "lora", "a"),
                Named("m-2", "x", "main", "a"),
                Named("m-3", "x", "main", "b"),
            ],
            ["x.lora", "x.main@a", "x@b"],
        ),
        # a model not present never takes the name from a present one
        (
            [Named("m-1", "x", "lora", "a"), Named("m-abcdef9", "x", "lora", "a", present=False)],
            ["x", "x~abcdef"],
        ),
        # a qualified handle that is another model's name: both take their id
        (
            [
                Named("m-1", "a", "lora", "f"),
                Named("m-2", "a", "vae", "f"),
                Named("m-3", "a.lora", "lora", "f"),
            ],
            ["a.lora~1", "a.vae", "a.lora~3"],
        ),
    ],
)
def test_handle_scheme(models: list[Named], expected: list[str]) -> None:
    handles = assign(models)
    assert [handles[m.id] for m in models] == expected
    assert len({h.lower() for h in handles.values()}) == len(handles)


def test_registry_handles_resolve_and_show_in_listings(registry: Registry) -> None:
    page = registry.search(limit=100)
    handles = [m.handle for m in page.items]
    assert len(set(handles)) == len(handles)
    for item in page.items:
        record = registry.resolve(item.handle)
        assert record.id == item.id and record.handle == item.handle


def test_ambiguous_name_lists_each_candidate(registry: Registry) -> None:
    a = registry.resolve("style")
    b = registry.resolve("easynegative")
    registry.set_meta(b.id, {"name": "Style"})
    with pytest.raises(AmbiguousReference) as info:
        registry.resolve("style")
    assert sorted(info.value.details["matches"]) == sorted([a.id, b.id])
    candidates = info.value.details["candidates"]
    assert sorted(c["id"] for c in candidates) == sorted([a.id, b.id])
    by_id = {c["id"]: c for c in candidates}
    assert by_id[a.id] == {
        "id": a.id,
        "handle": "style.lora",
        "type": "lora",
        "format": "safetensors",
        "path": a.path,
    }
    assert by_id[b.id]["handle"] == "Style.textual_inversion"
    message = str(info.value)
    assert "style.lora (lora, safetensors, " in message and str(a.path) in message
    assert registry.resolve("style.lora").id == a.id  # each handle answers
    assert registry.resolve("STYLE.TEXTUAL_INVERSION").id == b.id
