"""Pipelines from parts: the choice of text encoders and VAE for a transformer-only Flux or SD3 file
(``parts.py``, on tables), then through an orchestrator with an in-process CPU worker: a load places
every part, two transformers share one T5 segment in the RAM cache, a pinned part is used, an
incompatible pinned part and a missing part are refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.orchestrator.errors import IncompatiblePart, MissingPart
from modelkeeper.orchestrator.parts import Candidate, Needs, needs_from_shapes, resolve, roles
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from tests.orchestrator.conftest import run, serving

FLUX = Needs("flux", text_width=4096, pooled_width=768)
SD3 = Needs("sd3", text_width=4096, pooled_width=2048)
T5 = Candidate("m-t5", "t5xxl-bf16", "t5_xxl", 4096, bases=("sd3", "flux"))
T5_FP8 = Candidate("m-t5f", "t5xxl-fp8", "t5_xxl", 4096, quant="float8_e4m3fn")
T5_XL = Candidate("m-t5xl", "t5-xl", "t5_xxl", 2048)
CLIP_L = Candidate("m-cl", "clip-l", "clip_l", 768)
CLIP_G = Candidate("m-cg", "clip-g", "clip_g", 1280, bases=("sdxl", "sd3"))
VAE16 = Candidate("m-fv", "flux-vae", "vae", 16, base="flux", bases=("sd3",))
VAE16_SD3 = Candidate("m-sv", "sd3-vae", "vae", 16, base="sd3", bases=("flux",))
VAE4 = Candidate("m-v4", "sdxl-vae", "vae", 4, base="sdxl")
ALL = [T5, T5_FP8, T5_XL, CLIP_L, CLIP_G, VAE16, VAE16_SD3, VAE4]


def picked(needs: Needs, candidates: list[Candidate], pins: dict[str, Any] | None = None) -> dict[str, str]:
    """role -> the handle chosen, or status: why."""
    return {
        c.role.name: c.candidate.handle if c.candidate else f"{c.status}: {c.why}"
        for c in resolve(needs, candidates, pins)
    }


def test_roles_by_base_and_widths() -> None:
    assert [(r.name, r.kind, r.width) for r in roles(FLUX)] == [
        ("text_encoder", "clip_l", 768), ("text_encoder_2", "t5_xxl", 4096), ("vae", "vae", 16)]  # fmt: skip
    assert [(r.name, r.kind, r.width) for r in roles(SD3)] == [
        ("text_encoder", "clip_l", 768), ("text_encoder_2", "clip_g", 1280), ("text_encoder_3", "t5_xxl", 4096),
        ("vae", "vae", 16)]  # fmt: skip
    assert roles(Needs("sdxl")) == ()
    assert roles(FLUX)[1].wants == "T5-XXL, 4096 wide" and roles(FLUX)[2].wants == "VAE, 16 latent channels"


@pytest.mark.parametrize(
    ("base", "shapes", "text", "pooled"),
    [
        ("flux", {"context_embedder.weight": (3072, 4096), "time_text_embed.text_embedder.linear_1.weight": (3072, 768)}, 4096, 768),
        ("flux", {"model.diffusion_model.txt_in.weight": [3072, 4096], "model.diffusion_model.vector_in.in_layer.weight": [3072, 768]}, 4096, 768),
        ("sd3", {"context_embedder.weight": (1536, 4096), "y_embedder.mlp.0.weight": (1536, 2048)}, 4096, 2048),
        ("sd3", {"context_embedder.bias": (1536,), "pos_embed.proj.weight": (1536, 16, 2, 2)}, None, None),
    ],
)  # fmt: skip
def test_needs_from_shapes(base: str, shapes: dict[str, Any], text: int | None, pooled: int | None) -> None:
    """diffusers, BFL (prefixed, as ComfyUI saves it) and MMDiT names; unknown widths stay None."""
    assert needs_from_shapes(base, shapes) == Needs(base, text, pooled)


@pytest.mark.parametrize(
    ("needs", "candidates", "expected"),
    [
        # full precision first, the transformer's own base first; a T5-XL is no T5-XXL of 4096
        (FLUX, ALL, {"text_encoder": "clip-l", "text_encoder_2": "t5xxl-bf16", "vae": "flux-vae"}),
        (SD3, ALL, {"text_encoder": "clip-l", "text_encoder_2": "clip-g", "text_encoder_3": "t5xxl-bf16",
                    "vae": "sd3-vae"}),
        (FLUX, [T5_FP8, CLIP_L, VAE16], {"text_encoder": "clip-l", "text_encoder_2": "t5xxl-fp8", "vae": "flux-vae"}),
        # an unknown width (no shapes read) takes any T5
        (Needs("flux"), [T5_XL, CLIP_L, VAE16], {"text_encoder": "clip-l", "text_encoder_2": "t5-xl", "vae": "flux-vae"}),
        (FLUX, [CLIP_L, VAE4], {
            "text_encoder": "clip-l",
            "text_encoder_2": "missing: none in the registry",
            "vae": "missing: none fits (sdxl-vae (VAE, 4 latent channels): flux needs 16 latent channels)"}),
        (FLUX, [T5_XL, CLIP_L, VAE16], {
            "text_encoder": "clip-l", "vae": "flux-vae",
            "text_encoder_2": "missing: none fits (t5-xl (T5-XXL, 2048 wide): flux needs 4096 wide)"}),
        (SD3, [T5, CLIP_L, VAE16], {
            "text_encoder": "clip-l", "text_encoder_3": "t5xxl-bf16", "vae": "flux-vae",
            "text_encoder_2": "missing: none in the registry"}),
    ],
)  # fmt: skip
def test_choice(needs: Needs, candidates: list[Candidate], expected: dict[str, str]) -> None:
    assert picked(needs, candidates) == expected


def test_a_vae_made_for_another_base_and_an_unloadable_part_are_passed_over() -> None:
    sdxl16 = Candidate("m-x", "odd-vae", "vae", 16, base="sdxl")
    broken = Candidate("m-b", "a-broken-t5", "t5_xxl", 4096, unusable="its file is missing")
    got = picked(FLUX, [sdxl16, broken, CLIP_L])
    assert got["vae"] == "missing: none fits (odd-vae (VAE, 16 latent channels) is made for sdxl, not flux)"
    assert got["text_encoder_2"] == (
        "missing: none fits (a-broken-t5 (T5-XXL, 4096 wide) cannot be loaded: its file is missing)"
    )


def test_pins_are_used_when_they_fit_and_refused_with_the_reason() -> None:
    got = resolve(FLUX, ALL, {"text_encoder_2": T5_FP8})
    assert [(c.role.name, c.status, c.candidate and c.candidate.handle) for c in got] == [
        ("text_encoder", "auto", "clip-l"), ("text_encoder_2", "pinned", "t5xxl-fp8"), ("vae", "auto", "flux-vae")]  # fmt: skip
    refused = picked(FLUX, ALL, {"text_encoder_2": CLIP_G, "vae": VAE4, "text_encoder_3": T5, "text_encoder": "no such model"})  # fmt: skip
    assert refused == {
        "text_encoder": "refused: no such model",
        "text_encoder_2": "refused: clip-g (CLIP-G, 1280 wide) is not a T5-XXL",
        "vae": "refused: sdxl-vae (VAE, 4 latent channels): flux needs 16 latent channels",
        "text_encoder_3": "refused: flux transformers take no part 'text_encoder_3' "
        "(their parts: text_encoder, text_encoder_2, vae)",
    }


# ----------------------------------------------------------------------------- through the orchestrator

PARTS = ["flux-transformer", "flux-transformer-q8_0", "sd3-transformer", "t5", "t5-fp8-scaled", "clip-l", "clip-g",
         "flux-vae", "sd15-vae"]  # fmt: skip


@pytest.fixture(scope="module")
def parts_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("parts-demo"), only=PARTS)


SETTINGS = {"cache_fill": "before", "hash_on_start": True}


def test_a_transformer_loads_with_its_parts_and_shares_one_t5(
    parts_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(parts_demo, tmp_path, **SETTINGS) as orch:
            detail = await orch.views.model_detail("transformer/tiny-flux.safetensors")
            assert {p["role"]: (p["status"], p["handle"]) for p in detail["parts"]} == {
                "text_encoder": ("auto", "tiny-clip-l"), "text_encoder_2": ("auto", "tiny-t5"),
                "vae": ("auto", "tiny-flux-vae")}  # fmt: skip
            parts = {p["role"]: p for p in detail["parts"]}
            flux = (await orch.loads.load("transformer/tiny-flux.safetensors"))["result"]
            assert set(flux["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
            assert set(flux["sources"].values()) == {"ram"}
            assert flux["parts"] == {role: p["model_id"] for role, p in parts.items()}
            checked = await orch.operations.run("validate", flux["model_id"], None, {"level": "functional"})
            results = checked["result"][0]["components"]
            assert set(results) == set(flux["components"]) and all(r["passed"] for r in results.values())
            gguf = (await orch.loads.load("transformer/tiny-flux-Q8_0.gguf"))["result"]
            t5 = (await orch.catalog.resolve("clip/tiny-t5.safetensors")).components[0].content_id
            p1 = orch.view.get(flux["model_id"], flux["device"])
            p2 = orch.view.get(gguf["model_id"], gguf["device"])
            assert p1 is not None and p2 is not None
            assert p1.segments["text_encoder_2"] == p2.segments["text_encoder_2"] == t5
            sd3 = (await orch.loads.load("transformer/tiny-sd3.safetensors"))["result"]
            assert set(sd3["components"]) == {
                "transformer",
                "text_encoder",
                "text_encoder_2",
                "text_encoder_3",
                "vae",
            }
            handles = {(await orch.catalog.get(m)).handle for m in sd3["parts"].values()}
            assert handles == {"tiny-clip-l", "tiny-clip-g", "tiny-t5", "tiny-flux-vae"}
            checked = await orch.operations.run("validate", sd3["model_id"], None, {"level": "functional"})
            assert all(r["passed"] for r in checked["result"][0]["components"].values())
            segments = [s for s in orch.feed.segments() if s["component_id"] == t5]
            users = {flux["model_id"], gguf["model_id"], sd3["model_id"]}
            assert len(segments) == 1 and users <= set(segments[0]["models"])

    run(body)


def test_a_pinned_part_is_used_and_an_incompatible_one_refused(
    parts_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(parts_demo, tmp_path, **SETTINGS) as orch:
            ref = "transformer/tiny-flux-Q8_0.gguf"
            await orch.catalog.set_metadata(
                ref, {"default_settings": {"parts": {"text_encoder_2": "tiny-t5-fp8-scaled"}}}
            )
            detail = await orch.views.model_detail(ref)
            assert [p["handle"] for p in detail["parts"] if p["status"] == "pinned"] == ["tiny-t5-fp8-scaled"]
            done = (await orch.loads.load(ref))["result"]
            fp8 = (await orch.catalog.resolve("tiny-t5-fp8-scaled")).components[0].content_id
            placed = orch.view.get(done["model_id"], done["device"])
            assert placed is not None and placed.segments["text_encoder_2"] == fp8
            await orch.loads.unload(ref)
            for pin, reason in (
                ({"text_encoder_2": "tiny-clip-g"}, "tiny-clip-g (CLIP-G, 1280 wide) is not a T5-XXL"),
                ({"vae": "tiny-sd15-vae"}, "tiny-sd15-vae (VAE, 4 latent channels): flux needs 16 latent channels"),
            ):  # fmt: skip
                settings = {"default_settings": {"parts": pin}}
                with pytest.raises(IncompatiblePart) as err:  # refused when set through the service
                    await orch.catalog.set_metadata(ref, settings)
                assert reason in err.value.message
                # set in the registry directly (``modelkeeper meta --set``): refused at the load
                await orch.catalog.db(orch.catalog.registry.set_meta, done["model_id"], settings)
                with pytest.raises(IncompatiblePart) as err:
                    await orch.loads.load(ref)
                assert reason in err.value.message
                assert f"the {next(iter(pin))} pinned is refused" in err.value.message
            assert not orch.view.placements

    run(body)


def test_a_missing_part_is_named(parts_demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for rel in (
        "transformer/tiny-flux.safetensors",
        "clip/tiny-clip-l.safetensors",
        "vae/tiny-flux-vae.safetensors",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parts_demo.root / rel, root / rel)
    partial = DemoManifest(root=root, entries=(), seed=parts_demo.seed)

    async def body() -> None:
        async with serving(partial, tmp_path) as orch:
            with pytest.raises(MissingPart) as err:
                await orch.loads.load("transformer/tiny-flux.safetensors")
            message = err.value.message
            assert "flux transformer m-" in message
            assert "needs a text_encoder_2 (T5-XXL, 32 wide): none in the registry" in message
            assert err.value.details["parts"] == [
                {"role": "text_encoder_2", "wants": "T5-XXL, 32 wide", "why": "none in the registry"}]  # fmt: skip
            assert not orch.view.placements

    run(body)


def test_cli_show_lists_the_parts_and_a_pin(parts_demo: DemoManifest, tmp_path: Path) -> None:
    """``modelkeeper show`` on the registry alone: the parts table, its JSON, a pin refused (by
    ``meta --set``; written to the registry directly, ``show`` names it refused)."""
    import typer
    from typer.testing import CliRunner

    from modelkeeper.cli.registry import meta, show
    from modelkeeper.discovery.scanner import Scanner
    from modelkeeper.registry.store import Registry

    db = str(tmp_path / "registry.sqlite3")
    with Registry.open(db) as registry:
        Scanner(registry, [str(parts_demo.root)]).scan()
    app = typer.Typer()
    app.command("show")(show)
    app.command("meta")(meta)
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "tiny-flux", "--db", db], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "parts" in shown.stdout and "T5-XXL, 32 wide" in shown.stdout and "tiny-t5" in shown.stdout
    pin = 'default_settings={"parts": {"vae": "tiny-sd15-vae"}}'
    refused = runner.invoke(app, ["meta", "tiny-flux", "--set", pin, "--db", db])
    assert refused.exit_code == 1 and "the vae pinned is refused" in " ".join(refused.output.split())
    with Registry.open(db) as registry:  # written past the check (an older version, another tool)
        registry.set_meta(registry.resolve("tiny-flux").id, {"default_settings": pin.partition("=")[2]})
    data = json.loads(runner.invoke(app, ["show", "tiny-flux", "--json", "--db", db]).stdout)
    vae = next(p for p in data["parts"] if p["role"] == "vae")
    assert vae["status"] == "refused" and "flux needs 16 latent channels" in vae["why"]
    assert json.loads(runner.invoke(app, ["show", "tiny-t5", "--json", "--db", db]).stdout)["parts"] == []
