"""What the command line says about sizes, settings and API errors: units, names, suggestions,
never pydantic's locations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError
from typer.testing import CliRunner

from modelkeeper.cache import AmbiguousSegment, SegmentNotFound, resolve_segment
from modelkeeper.cli.app import app
from modelkeeper.cli.cache import short_id
from modelkeeper.cli.explain import close_models, invalid_fields, local_path
from modelkeeper.orchestrator import Settings
from modelkeeper.orchestrator.settings import settings_problem
from modelkeeper.sizes import format_size, parse_size

runner = CliRunner()


def test_sizes_are_decimal_as_the_dashboard_prints_them() -> None:
    assert format_size(8_663_070) == "8.7 MB" and format_size(0) == "0 B" and format_size(999) == "999 B"
    assert format_size(123_456_789) == "123 MB" and format_size(23_800_000_000) == "23.8 GB"
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 << 20
    assert parse_size("1.5 gb") == 1_500_000_000 and parse_size("1000000") == 10**6
    with pytest.raises(ValueError, match="negative"):
        parse_size("-5")
    with pytest.raises(ValueError, match="like 4GB"):
        parse_size("lots")


def test_settings_take_plain_lists_and_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKEEPER_DEVICES", "cuda:0, cpu")
    monkeypatch.setenv("MODELKEEPER_MODEL_ROOTS", "models")
    monkeypatch.setenv("MODELKEEPER_RAM_CACHE_BYTES", "8GB")
    s = Settings()
    assert s.devices == ["cuda:0", "cpu"] and s.model_roots == [Path("models")]
    assert s.ram_cache_bytes == 8 * 10**9
    monkeypatch.setenv("MODELKEEPER_MODEL_ROOTS", '["a", "b"]')
    assert Settings().model_roots == [Path("a"), Path("b")]


def _problem(**values: object) -> str:
    try:
        Settings(**values)  # type: ignore[arg-type]
    except (ValidationError, SettingsError) as exc:
        return settings_problem(exc)
    raise AssertionError("accepted")


def test_settings_errors_name_the_file_or_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('model_root = ["x"]\n')
    monkeypatch.setenv("MODELKEEPER_CONFIG", str(config))
    assert _problem() == f"{config}: unknown setting 'model_root' (did you mean 'model_roots'?)"
    monkeypatch.delenv("MODELKEEPER_CONFIG")
    monkeypatch.setenv("MODELKEEPER_RAM_CACHE_BYTES", "8XB")
    problem = _problem()
    assert problem.startswith("MODELKEEPER_RAM_CACHE_BYTES: '8XB'") and "like 4GB" in problem, problem
    result = runner.invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2 and "MODELKEEPER_RAM_CACHE_BYTES" in result.output
    assert "pydantic" not in result.output and "Value error" not in result.output, result.output


def test_validation_errors_in_option_words() -> None:
    errors = [
        {"loc": ["body", "offload", "literal['none','auto']"], "msg": "Input should be 'none' or 'auto'"},
        {"loc": ["body", "offload", "constrained-int"], "msg": "Input should be greater than or equal to 0"},
        {"loc": ["query", "state"], "msg": "String should match pattern '^(queued|running)$'"},
        {"loc": ["body", "colour"], "msg": "String should match pattern '^x$'"},
    ]
    assert invalid_fields(errors) == [
        "--offload: expected none, auto or a size like 4GB",
        "--state: expected queued, running, succeeded, failed or cancelled",
        "colour: not of the expected form",
    ]


def test_close_models_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = [
        {"handle": "tiny-sdxl@diffusers", "name": "tiny-sdxl"},
        {"handle": "tiny-sd15", "name": "tiny-sd15"},
    ]
    assert close_models("tiny-sdx", listing)[0] == "tiny-sdxl@diffusers"
    assert close_models("zzz", listing) == []
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert local_path("models/a.safetensors") == str(tmp_path / "models" / "a.safetensors")
    assert local_path("checkpoints/b.safetensors") == "checkpoints/b.safetensors"  # relative to a root
    assert local_path("tiny-sd15") == "tiny-sd15"


def test_cache_segments_by_prefix() -> None:
    a, b = "4f85905d6afc576f" + "0" * 48, "4f85905d7" + "1" * 55
    segments = [a, b]
    assert short_id(a) == "4f85905d6afc" and short_id("b3:" + a) == "b3:4f85905d6afc"
    assert resolve_segment("4f85905d6", segments) == a and resolve_segment(a, segments) == a
    assert resolve_segment("b3:4F85905D6", segments) == a  # the table's scheme and any case
    with pytest.raises(SegmentNotFound, match="no cached component 'deadbeef'"):
        resolve_segment("deadbeef", segments)
    with pytest.raises(AmbiguousSegment, match=f"matches 2 cached segments: {a}, {b}") as many:
        resolve_segment("4f85905d", segments)
    assert many.value.details["matches"] == [a, b]
    with pytest.raises(SegmentNotFound, match="at least 8"):
        resolve_segment("4f85", segments)


def test_ls_past_the_end_and_meta_read_as_words(tmp_path: Path) -> None:
    from modelkeeper.testing import write_demo_models

    demo = write_demo_models(tmp_path / "models", only=["sd15-checkpoint"])
    db = str(tmp_path / "registry.sqlite3")
    assert runner.invoke(app, ["scan", str(demo.root), "--db", db]).exit_code == 0
    result = runner.invoke(app, ["ls", "--offset", "100", "--db", db])
    assert result.exit_code == 0 and result.output.strip() == "no models at offset 100 (1 in all)", (
        result.output
    )
    assert runner.invoke(app, ["ls", "--db", db]).output.startswith("1 model")
    bad = runner.invoke(app, ["ls", "--status", "gone", "--db", db])
    said = " ".join(bad.output.replace("│", " ").split())
    assert bad.exit_code == 2 and "'gone' is not one of 'ok', 'missing', 'all'" in said, bad.output
    shown = runner.invoke(app, ["meta", "tiny-sd15", "--set", "tags=anime,style", "--db", db])
    assert shown.exit_code == 0 and "tags: anime, style" in shown.output, shown.output
    assert "description: —" in shown.output and "None" not in shown.output and "[" not in shown.output
    unset = runner.invoke(app, ["meta", "tiny-sd15", "--set", "tags", "--db", db])
    assert unset.exit_code == 1 and "--set wants key=value" in unset.output


def test_serve_fails_at_once_on_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = runner.invoke(
            app, ["serve", "--port", str(port), "--models", str(tmp_path), "--device", "cpu"]
        )
    assert result.exit_code == 1 and f"port {port} is in use" in result.output and "--port" in result.output
    assert "serving on" not in result.output, result.output


def test_error_lines_say_where_the_fault_lies(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from modelkeeper.cli import remote
    from modelkeeper.client import ApiError, Client

    def raises(exc: Exception) -> object:
        def fn(client: Client) -> object:
            raise exc

        return fn

    cases = [
        (
            ApiError(401, "UNAUTHORIZED", "a bearer token is required", {}),
            "--token, or set MODELKEEPER_TOKEN",
        ),
        (ValueError("Out of range float values are not JSON compliant"), "error Out of range float"),
    ]
    for exc, said in cases:
        with pytest.raises(typer.Exit):
            remote.call("http://127.0.0.1:9", None, raises(exc))  # type: ignore[arg-type]
        text = capsys.readouterr().err.replace("\n", " ")
        assert said in text and "reach" not in text, text


def test_serve_names_a_settings_file_that_is_not_toml(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("model_roots = [\n")
    # serve --config sets MODELKEEPER_CONFIG: named in env, the runner puts it back afterwards
    result = runner.invoke(
        app, ["serve", "--config", str(config), "--port", "0"], env={"MODELKEEPER_CONFIG": None}
    )
    assert result.exit_code == 2 and "not valid TOML" in result.output and "config.toml" in result.output


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_served_connections_send_without_delay(loop: str) -> None:
    """``serve``'s socket says it is TCP, so the event loop sets TCP_NODELAY on every connection it
    accepts (without it each request after the first on a connection waited about 40 ms: uvicorn
    writes an answer's head and body apart, and Nagle held the body for the client's delayed ACK)."""
    import asyncio
    import socket

    from modelkeeper.cli.serve import bind

    sock = bind("127.0.0.1", 0)
    sock.listen()
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while not seen:
                await asyncio.sleep(0.01)
            writer.close()

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())
    assert seen and seen[0] != 0
