"""Parts taken from a pipeline folder or a full checkpoint: a transformer-only Flux GGUF with no
standalone T5 beside it completes from a Flux diffusers folder's T5 and VAE (``completion.py``),
loads and runs; standalone parts win ties; a folder's component is pinned as ``handle:component``
and refused with the reason when it does not fit; ``show`` and the model detail name it; the RAM
cache holds its weights once and a device one module of it. The folder and the ComfyUI-style
all-in-one checkpoint are written here from the testing factories, with seeds of their own so that
their weights (and content ids) differ from the demo set's standalone parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkeeper.api.responses_catalog import PartInfo
from modelkeeper.formats.conventions import (
    COMFY_CLIP_L_PREFIX,
    COMFY_T5XXL_PREFIX,
    LDM_DENOISER_PREFIX,
)
from modelkeeper.orchestrator.errors import IncompatiblePart
from modelkeeper.orchestrator.parts import Candidate, Needs, resolve
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.components import (
    DEFAULT_SEED,
    component_config,
    make_text_encoder,
    make_transformer,
    make_vae,
    state_dict_for_save,
)
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.testing.files import save_component_folder, to_original_layout, write_safetensors
from tests.orchestrator.conftest import run, serving

FOLDER = "diffusers/tiny-flux-folder"
CHECKPOINT = "checkpoints/tiny-flux-aio.safetensors"
GGUF = "transformer/tiny-flux-Q8_0.gguf"
BF16 = "transformer/tiny-flux.safetensors"
SETTINGS = {"cache_fill": "before", "hash_on_start": True}


def flux_modules(seed: int) -> dict[str, torch.nn.Module]:
    """A tiny Flux pipeline's models (float16, as the demo set stores them), by diffusers slot."""
    return {
        "transformer": make_transformer("flux", seed=seed, dtype=torch.float16),
        "text_encoder": make_text_encoder("clip_l", seed=seed, dtype=torch.float16),
        "text_encoder_2": make_text_encoder("t5", seed=seed, dtype=torch.float16),
        "vae": make_vae("flux", seed=seed, dtype=torch.float16),
    }


def write_flux_folder(folder: Path, seed: int) -> Path:
    """A FluxPipeline diffusers folder: ``model_index.json`` and one folder per model."""
    index: dict[str, Any] = {"_class_name": "FluxPipeline", "_diffusers_version": "0.32.0"}
    for slot, module in flux_modules(seed).items():
        save_component_folder(module, folder / slot)
        index[slot] = [
            "diffusers" if slot in ("transformer", "vae") else "transformers",
            type(module).__name__,
        ]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_flux_checkpoint(path: Path, seed: int, transformer_dtype: torch.dtype = torch.float16) -> Path:
    """A ComfyUI all-in-one Flux file: the transformer under ``model.diffusion_model.`` (in
    ``transformer_dtype``: fp8 as ComfyUI's ``flux1-dev-fp8``), the VAE under
    ``first_stage_model.``, CLIP-L and T5 under ``text_encoders.clip_l.`` / ``.t5xxl.``."""
    m = flux_modules(seed)
    state = {
        LDM_DENOISER_PREFIX + k: v.to(transformer_dtype) if v.dim() > 1 else v
        for k, v in state_dict_for_save(m["transformer"]).items()
    }
    state |= to_original_layout("vae", state_dict_for_save(m["vae"]), component_config(m["vae"]))
    state |= to_original_layout(
        "clip_l", state_dict_for_save(m["text_encoder"]), {}, prefix=COMFY_CLIP_L_PREFIX + "transformer."
    )
    state |= to_original_layout(
        "t5", state_dict_for_save(m["text_encoder_2"]), {}, prefix=COMFY_T5XXL_PREFIX + "transformer."
    )
    return write_safetensors(state, path)


@pytest.fixture(scope="module")
def folder_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    """Two transformer-only Flux files and a standalone CLIP-L, no standalone T5 or VAE, and a Flux folder."""
    demo = write_demo_models(tmp_path_factory.mktemp("folder-parts"), only=["flux-transformer", "flux-transformer-q8_0", "clip-l"])  # fmt: skip
    write_flux_folder(demo.root / FOLDER, DEFAULT_SEED + 7)
    return demo


@pytest.fixture(scope="module")
def checkpoint_demo(folder_demo: DemoManifest, tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    """The GGUF transformer beside an all-in-one Flux checkpoint, and nothing else."""
    root = tmp_path_factory.mktemp("checkpoint-parts")
    (root / GGUF).parent.mkdir(parents=True)
    shutil.copy(folder_demo.root / GGUF, root / GGUF)
    write_flux_checkpoint(root / CHECKPOINT, DEFAULT_SEED + 9)
    return DemoManifest(root=root, entries=(), seed=folder_demo.seed)


def component_id(record: Any, name: str) -> str:
    return next(c.content_id for c in record.components if c.name == name)


# ----------------------------------------------------------------------------- the choice, on tables

FLUX = Needs("flux", text_width=4096, pooled_width=768)
T5 = Candidate("m-t5", "zz-t5", "t5_xxl", 4096, base="any")
T5_FP8 = Candidate("m-t5f", "t5-fp8", "t5_xxl", 4096, base="any", quant="float8_e4m3fn")
FOLDER_T5 = Candidate("m-fo", "aa-flux-folder", "t5_xxl", 4096, base="any", component="text_encoder_2")
FOLDER_VAE = Candidate("m-fo", "aa-flux-folder", "vae", 16, base="flux", component="vae")
VAE = Candidate("m-v", "zz-flux-vae", "vae", 16, base="flux", bases=("sd3",))
CLIP_L = Candidate("m-cl", "clip-l", "clip_l", 768)


def test_standalone_parts_win_ties_and_full_precision_beats_a_standalone_fp8() -> None:
    """Equal form: the standalone part first, whatever the handles; a folder's bf16 T5 before a
    standalone fp8 one (form before origin); the order of the candidates changes nothing."""
    for candidates in ([FOLDER_T5, FOLDER_VAE, T5, VAE, CLIP_L], [CLIP_L, VAE, T5, FOLDER_VAE, FOLDER_T5]):
        got = {c.role.name: c.candidate.ref for c in resolve(FLUX, candidates) if c.candidate}
        assert got == {"text_encoder": "clip-l", "text_encoder_2": "zz-t5", "vae": "zz-flux-vae"}
    got = {
        c.role.name: c.candidate.ref
        for c in resolve(FLUX, [T5_FP8, FOLDER_T5, FOLDER_VAE, CLIP_L])
        if c.candidate
    }
    assert got == {"text_encoder": "clip-l", "text_encoder_2": "aa-flux-folder:text_encoder_2",
                   "vae": "aa-flux-folder:vae"}  # fmt: skip


def test_a_folder_vae_is_its_base_s_own() -> None:
    """A Flux folder's VAE is a Flux VAE: an SD3 transformer does not take it (a standalone
    16-channel VAE, whose base shapes cannot settle, fits both)."""
    sd3 = Needs("sd3", text_width=4096, pooled_width=2048)
    vae = next(c for c in resolve(sd3, [FOLDER_VAE]) if c.role.name == "vae")
    assert vae.status == "missing"
    assert vae.why == "none fits (aa-flux-folder:vae (VAE, 16 latent channels) is made for flux, not sd3)"


# ----------------------------------------------------------------------------- through the orchestrator


def test_a_gguf_transformer_completes_from_a_flux_folder(folder_demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(folder_demo, tmp_path, **SETTINGS) as orch:
            folder = await orch.catalog.resolve(FOLDER)
            detail = await orch.views.model_detail(GGUF)
            assert {p["role"]: (p["status"], p["handle"], p["component"]) for p in detail["parts"]} == {
                "text_encoder": ("auto", "tiny-clip-l", None),  # the standalone CLIP-L wins the tie
                "text_encoder_2": ("auto", "tiny-flux-folder", "text_encoder_2"),
                "vae": ("auto", "tiny-flux-folder", "vae")}  # fmt: skip
            assert all(PartInfo.model_validate(p) for p in detail["parts"])  # GET /api/model/{id}'s shape
            assert detail["parts"][1]["model_id"] == folder.id

            gguf = (await orch.loads.load(GGUF))["result"]
            assert set(gguf["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
            assert gguf["parts"]["text_encoder_2"] == gguf["parts"]["vae"] == folder.id
            placed = orch.view.get(gguf["model_id"], gguf["device"])
            assert placed is not None
            assert placed.segments["text_encoder_2"] == component_id(folder, "text_encoder_2")
            assert placed.segments["vae"] == component_id(folder, "vae")
            assert placed.component_bytes["text_encoder_2"] < folder.size / 10  # the T5 alone, not the folder
            checked = await orch.operations.run("validate", gguf["model_id"], None, {"level": "functional"})
            results = checked["result"][0]["components"]
            assert set(results) == set(gguf["components"]) and all(r["passed"] for r in results.values())

            # a second transformer takes the same T5: one segment, one module on the device
            bf16 = (await orch.loads.load(BF16))["result"]
            assert bf16["parts"] == gguf["parts"]
            shared = orch.views.device("cpu")["models"]
            assert all(set(p["shared"]) == {"text_encoder", "text_encoder_2", "vae"} for p in shared)
            t5 = component_id(folder, "text_encoder_2")
            assert placed.shares["text_encoder_2"].startswith(f"{folder.id}:{t5}")
            # the folder itself, loaded as a pipeline, reads its T5 from the same segment
            await orch.loads.load(FOLDER)
            segments = [s for s in orch.feed.segments() if s["component_id"] == t5]
            assert len(segments) == 1
            assert {gguf["model_id"], bf16["model_id"], folder.id} <= set(segments[0]["models"])

            # reconcile adopts the placements again with their parts (the folder's components)
            orch.view.remove(gguf["model_id"], gguf["device"])
            await orch.recovery.reconcile(gguf["device"])
            again = orch.view.get(gguf["model_id"], gguf["device"])
            assert again is not None and again.parts == placed.parts

    run(body)


def test_a_folder_component_is_pinned_and_a_misfit_refused(folder_demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(folder_demo, tmp_path, **SETTINGS) as orch:
            folder = await orch.catalog.resolve(FOLDER)
            pin = {"default_settings": {"parts": {"text_encoder": "tiny-flux-folder:text_encoder"}}}
            await orch.catalog.set_metadata(GGUF, pin)
            detail = await orch.views.model_detail(GGUF)
            first = detail["parts"][0]
            assert (first["status"], first["handle"], first["component"]) == ("pinned", "tiny-flux-folder", "text_encoder")  # fmt: skip
            done = (await orch.loads.load(GGUF))["result"]
            placed = orch.view.get(done["model_id"], done["device"])
            assert placed is not None and placed.segments["text_encoder"] == component_id(
                folder, "text_encoder"
            )
            assert done["parts"]["text_encoder"] == folder.id
            await orch.loads.unload(GGUF)

            for role, ref, reason in (
                ("text_encoder_2", "tiny-flux-folder:vae", "tiny-flux-folder:vae (VAE, 16 latent channels) is not a T5-XXL"),
                ("text_encoder_2", "tiny-flux-folder:text_encoder", "tiny-flux-folder:text_encoder (CLIP-L, 768 wide) is not a T5-XXL"),
                ("vae", "tiny-flux-folder", "tiny-flux-folder is a main model, not a part: pin one of its components "
                 "(tiny-flux-folder:text_encoder, tiny-flux-folder:text_encoder_2, tiny-flux-folder:vae)"),
                ("vae", "tiny-flux-folder:unet", "tiny-flux-folder has no text encoder or VAE component 'unet'"),
                ("vae", "no-such-model:vae", "the reference 'no-such-model'"),
            ):  # fmt: skip
                settings = {"default_settings": {"parts": {role: ref}}}
                with pytest.raises(IncompatiblePart) as err:  # refused when set through the service
                    await orch.catalog.set_metadata(GGUF, settings)
                assert f"the {role} pinned is refused" in err.value.message and reason in err.value.message
                await orch.catalog.db(orch.catalog.registry.set_meta, done["model_id"], settings)
                with pytest.raises(IncompatiblePart) as err:  # written to the registry directly: at the load
                    await orch.loads.load(GGUF)
                assert reason in err.value.message
            assert not orch.view.placements

    run(body)


def test_a_full_checkpoint_s_encoders_and_vae_complete_a_transformer(
    checkpoint_demo: DemoManifest, tmp_path: Path
) -> None:
    """ComfyUI's all-in-one Flux file keeps T5 as ``text_encoder_3`` under ``text_encoders.t5xxl.``:
    its width is read from its tensors, and the worker loads it from the checkpoint (through its
    RAM-cache segment: the component's tensors alone)."""

    async def body() -> None:
        async with serving(checkpoint_demo, tmp_path, **SETTINGS) as orch:
            aio = await orch.catalog.resolve(CHECKPOINT)
            spec = await orch.catalog.db(orch.catalog.registry.worker_spec, aio.id, "text_encoder_3")
            assert spec["config_source"] == "known:flux_dev/text_encoder_2"  # T5's own config, fitted
            detail = await orch.views.model_detail(GGUF)
            assert {p["role"]: (p["status"], p["handle"], p["component"], p["wants"]) for p in detail["parts"]} == {
                "text_encoder": ("auto", "tiny-flux-aio", "text_encoder", "CLIP-L, 768 wide"),
                "text_encoder_2": ("auto", "tiny-flux-aio", "text_encoder_3", "T5-XXL, 32 wide"),
                "vae": ("auto", "tiny-flux-aio", "vae", "VAE, 16 latent channels")}  # fmt: skip
            gguf = (await orch.loads.load(GGUF))["result"]
            placed = orch.view.get(gguf["model_id"], gguf["device"])
            assert placed is not None
            assert placed.segments["text_encoder_2"] == component_id(aio, "text_encoder_3")
            checked = await orch.operations.run("validate", gguf["model_id"], None, {"level": "functional"})
            assert all(r["passed"] for r in checked["result"][0]["components"].values())

    run(body)


def test_cli_show_names_the_folder_and_its_component(folder_demo: DemoManifest, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from modelkeeper.cli.registry import meta, show
    from modelkeeper.discovery.scanner import Scanner
    from modelkeeper.registry.store import Registry

    db = str(tmp_path / "registry.sqlite3")
    with Registry.open(db) as registry:
        Scanner(registry, [str(folder_demo.root)]).scan()
    app = typer.Typer()
    app.command("show")(show)
    app.command("meta")(meta)
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "tiny-flux-Q8_0", "--db", db], env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    assert "tiny-flux-folder:text_encoder_2" in shown.stdout and "tiny-flux-folder:vae" in shown.stdout
    data = json.loads(runner.invoke(app, ["show", "tiny-flux-Q8_0", "--json", "--db", db]).stdout)
    assert [(p["handle"], p["component"]) for p in data["parts"]] == [
        ("tiny-clip-l", None), ("tiny-flux-folder", "text_encoder_2"), ("tiny-flux-folder", "vae")]  # fmt: skip


def test_the_folder_itself_takes_no_parts(folder_demo: DemoManifest, tmp_path: Path) -> None:
    """A pipeline folder is complete: it is no transformer-only file, and has no parts to show."""

    async def body() -> None:
        async with serving(folder_demo, tmp_path) as orch:
            assert (await orch.views.model_detail(FOLDER))["parts"] == []

    run(body)


def test_two_parts_of_one_folder_not_hashed_yet_are_not_shared_as_one(
    folder_demo: DemoManifest, tmp_path: Path
) -> None:
    """Before hashing, a part's share token names its file: two text encoders of one folder (CLIP-L
    and T5, one type) must still be two modules, told apart by their component."""

    async def body() -> None:
        async with serving(folder_demo, tmp_path, hash_on_start=False) as orch:
            folder = await orch.catalog.resolve(FOLDER)
            assert component_id(folder, "text_encoder") is None  # the precondition: not hashed
            pin = {"default_settings": {"parts": {"text_encoder": "tiny-flux-folder:text_encoder"}}}
            await orch.catalog.set_metadata(GGUF, pin)
            done = (await orch.loads.load(GGUF))["result"]
            placed = orch.view.get(done["model_id"], done["device"])
            assert placed is not None and placed.shares["text_encoder"] != placed.shares["text_encoder_2"]
            checked = await orch.operations.run("validate", done["model_id"], None, {"level": "functional"})
            assert all(r["passed"] for r in checked["result"][0]["components"].values())

    run(body)


def test_a_component_s_form_is_its_own(tmp_path: Path) -> None:
    """An fp8 all-in-one file (the transformer fp8, its VAE and encoders fp16): the file's form is
    fp8, its VAE and encoders rank as full precision."""
    from modelkeeper.discovery.scanner import Scanner
    from modelkeeper.orchestrator.completion import component_candidates
    from modelkeeper.registry.store import Registry

    write_flux_checkpoint(tmp_path / "models" / CHECKPOINT, DEFAULT_SEED + 9, torch.float8_e4m3fn)
    with Registry.open(str(tmp_path / "registry.sqlite3")) as registry:
        Scanner(registry, [str(tmp_path / "models")]).scan()
        record = registry.resolve("tiny-flux-aio")
        assert record.identification.quant == "float8_e4m3fn"
        got = {c.component: (c.kind, c.width, c.quant) for c, _ in component_candidates(record)}
    assert got == {"text_encoder": ("clip_l", 768, None), "text_encoder_3": ("t5_xxl", 32, None),
                   "vae": ("vae", 16, None)}  # fmt: skip


def test_a_re_adopted_placement_read_from_disk_keeps_its_folder_parts(
    folder_demo: DemoManifest, tmp_path: Path
) -> None:
    """Read from disk, a folder's component reports its own folder (``.../text_encoder_2``) as the
    file read: ``reconcile`` knows it for the folder's part."""

    async def body() -> None:
        async with serving(folder_demo, tmp_path, cache_fill="alongside") as orch:
            done = (await orch.loads.load(GGUF))["result"]
            assert done["sources"]["text_encoder_2"] == "disk"
            orch.view.remove(done["model_id"], "cpu")
            await orch.recovery.reconcile("cpu")
            again = orch.view.get(done["model_id"], "cpu")
            assert again is not None and again.parts == done["parts"]

    run(body)
