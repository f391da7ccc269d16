"""``modelkeeper meta --set default_settings=...`` checks pinned parts as ``PUT /api/model/{id}/metadata``
does (``completion.check_pinned_parts``): a pin naming no model or a part that does not fit is refused
with the service's message, exit 1, nothing written; a fitting pin is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkeeper.cli.app import app
from modelkeeper.testing import write_demo_models

runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry of a tiny Flux transformer and the parts it could take (CLIP-L, T5, Flux VAE)."""
    root = tmp_path_factory.mktemp("pins")
    write_demo_models(root / "models", only=["flux-transformer", "flux-vae", "t5", "clip-l"])
    db = root / "registry.sqlite3"
    result = runner.invoke(app, ["scan", str(root / "models"), "--db", str(db)])
    assert result.exit_code == 0, result.output
    return db


def _pin(db: Path, role: str, ref: str) -> tuple[int, str]:
    settings = json.dumps({"parts": {role: ref}})
    result = runner.invoke(
        app, ["meta", "tiny-flux", "--db", str(db), "--set", f"default_settings={settings}"]
    )
    return result.exit_code, " ".join(result.output.split())  # unwrapped


def _settings(db: Path) -> object:
    result = runner.invoke(app, ["meta", "tiny-flux", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["default_settings"]


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("no-such-model", "the reference 'no-such-model': no model matches 'no-such-model'"),
        ("tiny-clip-l", "tiny-clip-l (CLIP-L, 768 wide) is not a T5-XXL"),
    ],
)
def test_a_pin_that_does_not_fit_is_refused_and_nothing_written(db: Path, ref: str, reason: str) -> None:
    before = _settings(db)
    code, output = _pin(db, "text_encoder_2", ref)
    assert code == 1
    assert "error INCOMPATIBLE_PART: flux transformer" in output
    assert f"(tiny-flux): the text_encoder_2 pinned is refused: {reason}" in output
    assert _settings(db) == before


def test_a_pin_that_fits_is_written(db: Path) -> None:
    code, output = _pin(db, "text_encoder_2", "tiny-t5")
    assert code == 0, output
    assert _settings(db) == {"parts": {"text_encoder_2": "tiny-t5"}}


def test_a_pin_on_a_model_that_takes_no_parts_is_refused(db: Path) -> None:
    """A VAE (or an SD1 checkpoint) is never completed from parts: a pin there would be ignored."""
    settings = json.dumps({"parts": {"vae": "tiny-flux-vae"}})
    result = runner.invoke(app, ["meta", "tiny-t5", "--db", str(db), "--set", f"default_settings={settings}"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert "tiny-t5 (text_encoder, " in output and "takes no parts" in output, output
    cleared = runner.invoke(
        app, ["meta", "tiny-t5", "--db", str(db), "--set", 'default_settings={"parts": {}}']
    )
    assert cleared.exit_code == 0, cleared.output  # clearing pins is always fine
