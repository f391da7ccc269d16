"""``modelkeeper serve`` as a real process, and the CLI commands against it."""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

import modelkeeper
from modelkeeper.cli import app
from modelkeeper.client import Client
from modelkeeper.testing import DemoManifest
from tests.api.conftest import CLIP_L, LORA, ServiceFactory

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(demo: DemoManifest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "MODELKEEPER_HASH_ON_START": "false", "MODELKEEPER_RAM_CACHE_BYTES": str(256 << 20)}
    cmd = [sys.executable, "-m", "modelkeeper", "serve", "--models", str(demo.root), "--device", "cpu",
           "--port", str(port), "--db", str(folder / "registry.sqlite3")]  # fmt: skip
    log = (folder / "serve.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (folder / "serve.log").read_text()
            assert time.monotonic() < end, "serve did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM), (folder / "serve.log").read_text()[-3000:]
        log.close()
        assert not glob.glob(f"/dev/shm/modelkeeper-{proc.pid}-*"), "segments left behind"


def cli(url: str, *args: str) -> str:
    result = runner.invoke(app, list(args), env={"MODELKEEPER_URL": url})
    assert result.exit_code == 0, result.output
    return result.output


def test_session_from_load_to_unload(served: str) -> None:
    with Client(served) as c:
        c.cache_clear(force=True)  # the module's service: an earlier test may have cached other models
    assert "ready" in cli(served, "status")
    out = cli(served, "load", "diffusers/tiny-sd15")
    assert "loaded tiny-sd15" in out and "on cpu" in out
    status = json.loads(cli(served, "status", "--json"))
    assert [m["name"] for m in status["devices"][0]["models"]] == ["tiny-sd15"]
    handle = status["devices"][0]["models"][0]["handle"]  # tells it from checkpoints/tiny-sd15
    wide = runner.invoke(app, ["status"], env={"MODELKEEPER_URL": served, "COLUMNS": "200"})
    assert f"{handle} (loaded)" in wide.output, wide.output
    # operation lines and the unload line name the model by its handle, never by its m-... id
    validated = cli(served, "validate", "diffusers/tiny-sd15", "--level", "weights")
    assert f"{handle} unet on cpu: passed" in validated and "m-" not in validated, validated
    timed = cli(served, "benchmark", "diffusers/tiny-sd15", "--steps", "1", "--warmup", "0")
    assert f"{handle} unet" in timed and "median" in timed and "m-" not in timed, timed
    optimized = cli(served, "optimize", "diffusers/tiny-sd15", "-o", "channels_last=true")
    assert f"{handle} unet: applied channels_last" in optimized and "m-" not in optimized, optimized
    cache = json.loads(cli(served, "cache", "--json"))
    assert cache["stats"]["segments"] == 3
    assert "RAM cache" in cli(served, "cache")
    jobs = json.loads(cli(served, "jobs", "--json"))
    assert {j["kind"] for j in jobs} >= {"scan", "load", "validate", "benchmark", "optimize"}
    assert json.loads(cli(served, "jobs", "show", jobs[0]["id"]))["id"] == jobs[0]["id"]
    # another form of a loaded model: refused, naming --reload; with it, loaded again in that form
    refused = runner.invoke(
        app, ["load", "diffusers/tiny-sd15", "--dtype", "bfloat16"], env={"MODELKEEPER_URL": served}
    )
    assert refused.exit_code == 1 and "ALREADY_LOADED" in refused.output and "--reload" in refused.output, (
        refused.output
    )
    assert "(reloaded)" in cli(served, "load", "diffusers/tiny-sd15", "--dtype", "bfloat16", "--reload")
    form = json.loads(cli(served, "status", "--json"))["devices"][0]["models"][0]
    assert form["dtype"] == "bfloat16", form
    assert cli(served, "unload", "diffusers/tiny-sd15").startswith(f"unloaded {handle} from cpu: ")
    assert "cached" in cli(served, "cache", "add", "checkpoints/tiny-sd15.safetensors")
    assert "dropped" in cli(served, "cache", "clear")


def test_cli_errors_are_readable(served: str) -> None:
    result = runner.invoke(app, ["load", "no-such-model"], env={"MODELKEEPER_URL": served})
    assert result.exit_code == 1 and "MODEL_NOT_FOUND" in result.output
    result = runner.invoke(app, ["load", "tiny-sdxl"], env={"MODELKEEPER_URL": served})
    assert result.exit_code == 1 and "matches" in result.output
    # a failed job names its code and job, never an HTTP status it did not have (was "HTTP 409")
    # (a revert on an offloaded model: its worker refuses it, in the user's words)
    cli(served, "load", "unet/tiny-sd15-unet.safetensors", "--offload", "1MB")
    try:
        result = runner.invoke(app, ["optimize", "unet/tiny-sd15-unet.safetensors", "--revert"],
                               env={"MODELKEEPER_URL": served})  # fmt: skip
        assert result.exit_code == 1 and "INVALID_REQUEST (job j-" in result.output, result.output
        shown = " ".join(result.output.split())
        assert "HTTP" not in shown and "tiny-sd15-unet@unet (unet) is partially resident" in shown, shown
        assert "m-" not in shown and "data." not in shown, shown
    finally:
        cli(served, "unload", "unet/tiny-sd15-unet.safetensors")
    cli(served, "load", "clip/tiny-clip-l.safetensors")
    try:
        # a resolution no worker takes is refused before any job, naming it
        result = runner.invoke(app, ["benchmark", "clip/tiny-clip-l.safetensors", "--resolution", "12"],
                               env={"MODELKEEPER_URL": served})  # fmt: skip
        assert result.exit_code == 1 and "INVALID_REQUEST" in result.output, result.output
        assert "job j-" not in result.output and "resolution" in result.output, result.output
        # an unknown optimisation is refused before any job, naming it
        result = runner.invoke(app, ["optimize", "clip/tiny-clip-l.safetensors", "-o", "colour=blue"],
                               env={"MODELKEEPER_URL": served})  # fmt: skip
        assert result.exit_code == 1 and "INVALID_REQUEST" in result.output, result.output
        assert "job j-" not in result.output and "colour" in result.output, result.output
    finally:
        cli(served, "unload", "clip/tiny-clip-l.safetensors")
    down = runner.invoke(app, ["status"], env={"MODELKEEPER_URL": "http://127.0.0.1:9"})
    assert down.exit_code == 1 and "cannot reach the service at http://127.0.0.1:9" in down.output
    assert "MODELKEEPER_URL" in down.output


def test_cli_errors_speak_the_cli_s_words(served: str) -> None:
    """The new user's trial: no pydantic locations, no "cannot reach" for a local error, close
    names for a typo, sizes for --offload, segments by id prefix."""
    env = {"MODELKEEPER_URL": served, "COLUMNS": "200"}

    def fails(*args: str) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code != 0, result.output
        assert "body." not in result.output and "query." not in result.output, result.output
        return result.output

    out = fails("lora", "strength", "diffusers/tiny-sd15", LORA, "nan")
    assert "strength must be a finite number" in out and "reach" not in out, out
    assert "did you mean tiny-sdxl" in fails("load", "tiny-sdx")
    assert "'--state': 'bogus' is not one of 'queued', 'running'" in fails("jobs", "--state", "bogus")
    assert "a size cannot be negative" in fails("load", CLIP_L, "--offload", "-5")
    assert "'--dtype': 'float64' is not one of 'float32'" in fails("load", CLIP_L, "--dtype", "float64")
    assert "relative to the service's model roots" in fails("load", "models/nowhere/x.safetensors")
    cli(served, "cache", "add", CLIP_L)
    with Client(served) as c:
        (segment,) = [s for s in c.cache()["segments"] if c.model(CLIP_L)["id"] in s["models"]]
        handle = c.model(CLIP_L)["handle"]
    table = runner.invoke(app, ["cache"], env=env).output
    assert segment["component_id"][:12] in table and handle in table and segment["component_id"] not in table
    assert "NOT_FOUND (HTTP 404): no cached component 'deadbeef'" in fails("cache", "drop", "deadbeef")
    assert f"dropped {segment['component_id'][:12]}" in cli(
        served, "cache", "drop", segment["component_id"][:8]
    )
    offloaded = cli(served, "load", "tiny-sdxl-unet", "--offload", "1MB").replace("\n", " ")  # 10^6 resident
    try:
        assert " on the device, " in offloaded and " streamed from RAM in " in offloaded, offloaded
    finally:
        cli(served, "unload", "tiny-sdxl-unet")
    done = json.loads(cli(served, "jobs", "--json", "--state", "succeeded"))[0]
    assert "already succeeded; nothing to cancel" in fails("jobs", "cancel", done["id"])


def test_a_path_from_the_current_folder_is_found(
    served: str, demo: DemoManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load models/clip/x.safetensors`` typed beside the model root: sent as an absolute path."""
    monkeypatch.chdir(demo.root.parent)
    out = cli(served, "load", f"{demo.root.name}/{CLIP_L}")
    assert "loaded tiny-clip-l" in out, out
    assert "unloaded" in cli(served, "unload", f"./{demo.root.name}/{CLIP_L}")


def test_status_says_why_not_ready_and_a_401_names_the_token(make_service: ServiceFactory) -> None:
    with make_service(preload=["no-such-model"], token="s3cret", hash_on_start=False) as svc:
        with Client(svc.url, token="s3cret") as c:
            end = time.monotonic() + 60
            while c.http.get("/health/ready").json()["preload"]["pending"] and time.monotonic() < end:
                time.sleep(0.1)
        env = {"MODELKEEPER_URL": svc.url, "COLUMNS": "200"}
        refused = runner.invoke(app, ["status"], env=env)
        assert refused.exit_code == 1 and "--token, or set MODELKEEPER_TOKEN" in refused.output, (
            refused.output
        )
        shown = runner.invoke(app, ["status"], env={**env, "MODELKEEPER_TOKEN": "s3cret"})
        assert shown.exit_code == 0, shown.output
        assert "not ready" in shown.output and "preload no-such-model failed" in shown.output, shown.output


def test_serve_refuses_the_network_without_a_token(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--models", str(tmp_path)])
    assert result.exit_code == 2 and "token" in result.output


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


def test_version_and_help_read_well_at_80_columns() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"modelkeeper {modelkeeper.__version__}"
    paths = list(_commands(typer.main.get_command(app)))
    assert ("lora", "apply") in paths and ("lora", "strength") in paths and ("lora", "remove") in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        assert "<bool>" not in text and "`" not in text, (path, text)
        assert max(len(line) for line in text.splitlines()) <= 80, (path, text)
        if "─ Commands ─" in text:  # a command's description wraps full there, never ragged
            listing = text[text.index("─ Commands ─") :].splitlines()[1:]
            for line, after in itertools.pairwise(listing):
                if re.match(r"│ {10,}\w", after):
                    assert len(line.rstrip(" │")) >= 55, (path, line)


def test_lora_commands_status_progress_and_revert(served: str) -> None:
    wide = {"MODELKEEPER_URL": served, "COLUMNS": "200"}
    cli(served, "load", "diffusers/tiny-sd15")
    try:
        out = cli(served, "lora", "apply", "diffusers/tiny-sd15", LORA, "--strength", "0.8")
        assert "applied" in out and "on cpu" in out, out
        placement = json.loads(cli(served, "status", "--json"))["devices"][0]["models"][0]
        (applied,) = placement["loras"].values()
        assert applied["strength"] == 0.8
        shown = runner.invoke(app, ["status"], env=wide)
        assert f"+ {applied['lora']} x0.8" in shown.output, shown.output
        # a negative strength as typed (no `--` before it), an option after it still one
        negative = cli(served, "lora", "strength", "diffusers/tiny-sd15", LORA, "-0.5", "--device", "cpu")
        assert "strength -0.5 on cpu" in negative, negative
        typo = runner.invoke(
            app, ["lora", "strength", "diffusers/tiny-sd15", LORA, "-0.5", "--devcie", "cpu"], env=wide
        )
        assert typo.exit_code == 2 and "No such option: --devcie" in typo.output, typo.output
        assert "strength 0.5" in cli(served, "lora", "strength", "diffusers/tiny-sd15", LORA, "0.5")
        # a reload in another form drops the LoRA and says so; the test applies it again
        reloaded = cli(served, "load", "diffusers/tiny-sd15", "--dtype", "bfloat16", "--reload")
        assert "(reloaded)" in reloaded and "dropped LoRAs" in reloaded and "x0.5" in reloaded, reloaded
        assert "applied" in cli(served, "lora", "apply", "diffusers/tiny-sd15", LORA, "--strength", "0.5")
        assert "removed" in cli(served, "lora", "remove", "diffusers/tiny-sd15", LORA)
        assert json.loads(cli(served, "status", "--json"))["devices"][0]["models"][0]["loras"] == {}
        # a long operation is never silent: started, then its end (stderr is no terminal here)
        bench = cli(served, "benchmark", "diffusers/tiny-sd15", "--steps", "1", "--warmup", "0")
        assert "benchmark j-" in bench and ": started" in bench and ": succeeded" in bench, bench
        assert "channels_last" in cli(served, "optimize", "diffusers/tiny-sd15", "-o", "channels_last=true")
        reverted = cli(served, "optimize", "diffusers/tiny-sd15", "--revert")
        assert "reverted channels_last" in reverted and "applied nothing" not in reverted, reverted
    finally:
        cli(served, "unload", "diffusers/tiny-sd15")


def test_ctrl_c_stops_serve_quietly(demo: DemoManifest, tmp_path: Path) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group: the workers (in their own
    group) must not print a KeyboardInterrupt traceback; the service stops them."""
    port = free_port()
    env = {**os.environ, "MODELKEEPER_HASH_ON_START": "false"}
    cmd = [sys.executable, "-m", "modelkeeper", "serve", "--models", str(demo.root), "--device", "cpu",
           "--port", str(port), "--db", str(tmp_path / "registry.sqlite3")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < end, "serve did not become ready"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal does: the service's whole group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.decode("utf-8", "replace")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert proc.returncode in (0, 130, -signal.SIGINT), (proc.returncode, text)


def test_optimize_memory_through_rest_and_cli(served: str) -> None:
    cli(served, "load", "diffusers/tiny-sd15")
    with Client(served) as c:
        kept = c.optimize_memory("cpu")  # no target: caches only, every model stays
        assert kept["unloaded"] == [] and kept["device"] == "cpu"
        assert [m["name"] for m in c.status("cpu")["models"]] == ["tiny-sd15"]
        lease = c.lease("diffusers/tiny-sd15", holder="test", ttl=60)
        held = c.optimize_memory("cpu", target_free_mb=1 << 30)  # more than any budget
        assert held["unloaded"] == [] and not held["target_met"] and held["kept"]
        c.release_lease(lease["id"])
    out = cli(served, "optimize-memory", "cpu", "--target-mb", str(1 << 30))
    assert "unloaded" in out and "target NOT met" in out, out
    status = json.loads(cli(served, "status", "--json"))
    assert status["devices"][0]["models"] == []  # the view followed the worker


def test_a_terminal_sees_a_moving_bar_for_one_placement(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One placement reports 0 of 1 until the end: the bar pulses and names the device instead
    of standing at 0% (benchmark looked frozen for 16 s)."""
    import io

    from rich.console import Console

    from modelkeeper.cli import remote

    cli(served, "load", "diffusers/tiny-sd15")  # before the screen: a load's bar may show 0% at its start
    screen = io.StringIO()
    monkeypatch.setattr(remote, "err", Console(file=screen, force_terminal=True, width=80))
    try:
        with Client(served) as c:
            answer = c.benchmark("diffusers/tiny-sd15", wait=False, steps=2, warmup=0)
            assert remote.follow_job(c, answer["job"])["state"] == "succeeded"
    finally:
        cli(served, "unload", "diffusers/tiny-sd15")
    shown = screen.getvalue()
    assert "benchmark on cpu" in shown and " 0%" not in shown, shown[-2000:]
