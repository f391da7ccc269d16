"""Walking roots: candidates, diffusers folders, symlinks (loops, escapes, aliases), folder hints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from stripped import write_stripped

from conftest import scan
from modelkeeper.discovery.errors import RootNotFound
from modelkeeper.discovery.rules.hints import hints_for
from modelkeeper.discovery.walker import CandidateKind, Walker
from modelkeeper.registry.store import Registry

EMBEDDING = {"emb_params": ("F32", (2, 768))}


def _walk(*roots: Path, **options: bool) -> dict[str, tuple[CandidateKind, str | None]]:
    out = {}
    for c in Walker([str(r) for r in roots], **options):
        out[c.rel] = (c.kind, c.error.code.value if c.error else None)
    return out


def test_candidates_by_suffix_and_folder(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.sft", "c.ckpt", "d.pt", "e.pth", "f.bin", "g.gguf", "h.SAFETENSORS"):
        write_stripped(tmp_path / "m" / name, EMBEDDING)
    (tmp_path / "m" / "notes.txt").write_text("not a model")
    (tmp_path / "m" / "a.json").write_text("{}")
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    write_stripped(pipe / "unet" / "diffusion_pytorch_model.safetensors", EMBEDDING)
    comp = tmp_path / "deep" / "er" / "vae"
    comp.mkdir(parents=True)
    (comp / "config.json").write_text("{}")
    write_stripped(comp / "diffusion_pytorch_model.fp16.safetensors", EMBEDDING)
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "config.json").write_text("{}")  # a config without weights is not a model folder
    found = _walk(tmp_path)
    files = {k for k, (kind, _) in found.items() if kind is CandidateKind.FILE}
    assert files == {
        f"m/{n}"
        for n in ("a.safetensors", "b.sft", "c.ckpt", "d.pt", "e.pth", "f.bin", "g.gguf", "h.SAFETENSORS")
    }
    assert found["pipe"] == (CandidateKind.PIPELINE, None)
    assert found["deep/er/vae"] == (CandidateKind.COMPONENT, None)
    assert not any(k.startswith("pipe/") for k in found)  # a pipeline is one candidate


def test_root_that_is_a_diffusers_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    write_stripped(tmp_path / "model.safetensors", EMBEDDING)
    assert _walk(tmp_path) == {".": (CandidateKind.COMPONENT, None)}


def test_missing_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RootNotFound):
        Walker([str(tmp_path / "nope")])


def test_symlink_loop_to_an_ancestor_is_rejected_and_walk_completes(tmp_path: Path) -> None:
    write_stripped(tmp_path / "a" / "x.safetensors", EMBEDDING)
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink("self.safetensors", tmp_path / "a" / "self.safetensors")  # a link to itself
    found = _walk(tmp_path)
    assert found["a/x.safetensors"] == (CandidateKind.FILE, None)
    assert found["a/loop"][1] == "FILE_NOT_FOUND"
    assert found["a/self.safetensors"][1] == "FILE_NOT_FOUND"
    assert len(found) == 3


def test_alias_link_is_walked_once(tmp_path: Path) -> None:
    write_stripped(tmp_path / "real" / "x.safetensors", EMBEDDING)
    os.symlink(tmp_path / "real", tmp_path / "alias")
    found = _walk(tmp_path)
    assert [k for k in found if k.endswith("x.safetensors")] == ["alias/x.safetensors"]  # first by name, once


def test_links_out_of_the_roots(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_stripped(outside / "y.safetensors", EMBEDDING)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "out_dir")
    os.symlink(outside / "y.safetensors", root / "out_file.safetensors")
    os.symlink(tmp_path / "missing.safetensors", root / "broken.safetensors")
    found = _walk(root)
    assert found["out_dir"][1] == "FILE_NOT_FOUND"
    assert found["out_file.safetensors"][1] == "FILE_NOT_FOUND"
    assert found["broken.safetensors"][1] == "FILE_NOT_FOUND"
    (link,) = [c for c in Walker([str(root)]) if c.rel == "out_file.safetensors"]
    assert link.error is not None and link.error.details["setting"] == "allow_outside_roots"
    for words in ("--allow-outside-roots", "MODELKEEPER_ALLOW_OUTSIDE_ROOTS", str(outside / "y.safetensors")):
        assert words in link.error.message  # the error names the setting that allows it, and the target
    allowed = _walk(root, allow_outside_roots=True)
    assert allowed["out_dir/y.safetensors"] == (CandidateKind.FILE, None)
    assert allowed["out_file.safetensors"] == (CandidateKind.FILE, None)
    # Links between two roots stay inside the roots.
    both = _walk(root, outside)
    assert both["out_file.safetensors"] == (CandidateKind.FILE, None)


def test_symlink_errors_are_recorded_as_rejected(tmp_path: Path, registry: Registry) -> None:
    write_stripped(tmp_path / "ok.safetensors", EMBEDDING)
    os.symlink(tmp_path, tmp_path / "loop")
    report = scan(registry, tmp_path)
    by_path = {e.path: e for e in report.entries}
    assert by_path["ok.safetensors"].status == "ok"
    assert by_path["loop"].status == "rejected"
    assert "loop" in (by_path["loop"].error or "")


def test_folder_hints() -> None:
    assert hints_for(("models", "loras")).type_hint is not None
    comfy = hints_for(("ComfyUI", "models", "checkpoints"))
    assert comfy.type_hint is not None and comfy.type_hint.name == "folder:checkpoints"
    assert hints_for(("models", "Stable-diffusion")).type_hint.conventions == ("a1111",)  # type: ignore[union-attr]
    invoke = hints_for(("models", "sdxl", "vae"))
    assert invoke.base is not None and invoke.base.value == "sdxl"
    assert hints_for(("stuff",)).type_hint is None


def test_hint_never_overrides_the_header(tmp_path: Path, registry: Registry) -> None:
    # An embedding in a loras folder under a misleading name stays an embedding; the conflict is reported.
    write_stripped(tmp_path / "models" / "loras" / "sdxl_lora_v2.safetensors", EMBEDDING)
    report = scan(registry, tmp_path)
    (entry,) = report.entries
    assert (entry.type, entry.base) == ("textual_inversion", "sd1")
    ident = registry.get(entry.model_id or "").identification
    assert ident.hints == ["folder:loras"]
    assert ident.hint_conflicts and "textual_inversion" in ident.hint_conflicts[0]


def test_invokeai_base_folder_breaks_a_tie_the_header_cannot(tmp_path: Path, registry: Registry) -> None:
    from stripped import shapes_of, vae_original

    vae = shapes_of(vae_original("sdxl", prefix=""), "F16")
    write_stripped(tmp_path / "models" / "sdxl" / "vae" / "sdxl-vae-fp16-fix.safetensors", vae)
    write_stripped(tmp_path / "other" / "same-vae.safetensors", vae)
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    hinted = by_path["models/sdxl/vae/sdxl-vae-fp16-fix.safetensors"]
    assert (hinted.type, hinted.base, hinted.rule) == ("vae", "sdxl", "vae.original")
    ident = registry.get(hinted.model_id or "").identification
    assert ident.rules["base"] == "vae.latent_4+hint.base_folder"
    assert ident.hints == ["folder:vae", "base_folder:sdxl"] and not ident.hint_conflicts
    plain = by_path["other/same-vae.safetensors"]
    assert plain.base == "sd1" and (plain.confidence or 1) < 1  # the header alone cannot tell


def test_unknown_tensors_are_reported_as_unknown(tmp_path: Path, registry: Registry) -> None:
    write_stripped(
        tmp_path / "optimizer.safetensors", {f"state.{i}.exp_avg": ("F32", (64, 64)) for i in range(20)}
    )
    (entry,) = scan(registry, tmp_path).entries
    assert (entry.status, entry.type, entry.base, entry.rule) == ("ok", "unknown", "unknown", "none")
    assert registry.worker_spec(entry.model_id or "")["loadable"] is False
