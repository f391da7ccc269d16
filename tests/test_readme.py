"""The README's session runs as written on a fresh registry.

The steps are read from README.md, never copied here: the ``console`` blocks of the section "A
session" (``$ make run``, the ``$ .venv/bin/modelkeeper ...`` lines, the ``$ curl ...`` lines) and
its ``python`` block. The service is started as ``make run`` starts it (the commands ``make -n run``
prints: the demo models written into a fresh folder, then ``modelkeeper serve``), on a free port,
the CPU and a registry of its own. Each CLI line runs as a real process of the venv's
``modelkeeper``; each curl line is sent as the same HTTP request (method, headers, body, URL with
the port put right); the Python block runs as a script. A step passes when it succeeds as the
README says:

- a CLI line exits 0 and prints, in order, the words the README shows for it (words with a digit,
  sizes' units and table borders left out: ids, times and sizes differ per machine);
- a curl line answers the status its comment names (``# 202 ...``), else 200, and every
  ``"key":"value"`` pair of the README's answer (ids left out) is in the JSON it got; a ``j-4-...``
  in a URL is the id of that kind the answers before it named;
- the Python block exits 0.

Before each step the segments filled beside earlier loads are complete: a user types the next
command seconds later, and the README's "from ram" must not race the fill.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from modelkeeper.client import DEFAULT_URL

if TYPE_CHECKING:
    from modelkeeper.testing import DemoManifest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## A session"
DEFAULT_PORT = urlsplit(DEFAULT_URL).port
SIZE_UNITS = {"B", "KB", "MB", "GB", "TB"}
BOX = re.compile(r"[\u2500-\u257f]")  # table borders: their widths follow the cells
JSON_PAIR = re.compile(r'"(\w+)":\s*("(?:[^"\\]|\\.)*"|true|false)')
ID = re.compile(r"^[a-z]-[0-9a-f]+(?:-[0-9a-f]+)*$")  # m-10f618e7d0e6, j-3-ec2ac9
PLACEHOLDER = re.compile(r"\b([a-z])-[\w-]*\.\.\.")  # j-4-...


# ---------------------------------------------------------------------- reading the README


@dataclass
class Step:
    """One ``$`` command of a console block, with what the README shows it printing."""

    line: int  # in README.md, for messages
    words: list[str]  # shell words, the comment left out
    comment: str  # what follows ``#``
    output: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"README.md:{self.line}: $ {shlex.join(self.words)}"


@dataclass
class Session:
    steps: list[Step]
    python: list[str]  # the python blocks' code


def fenced_blocks(lines: list[str], start: int) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the first line, lines) of each fenced block in ``lines``."""
    lang: str | None = None
    body: list[str] = []
    first = 0
    for n, text in enumerate(lines, start):
        if lang is None and text.startswith("```"):
            lang, body, first = text[3:].strip(), [], n + 1
        elif lang is not None and text.startswith("```"):
            yield lang, first, body
            lang = None
        elif lang is not None:
            body.append(text)


def split_comment(command: str) -> tuple[list[str], str]:
    """Shell words of ``command`` and its trailing ``# comment`` (a word starting with ``#``)."""
    words = shlex.split(command)
    cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))
    return words[:cut], " ".join(words[cut:]).lstrip("#").strip()


def console_steps(first: int, body: list[str]) -> list[Step]:
    """The ``$`` commands of a console block; a line ending in ``\\`` goes on on the next one, and
    the lines up to the next ``$`` are what it printed."""
    steps: list[Step] = []
    i = 0
    while i < len(body):
        if not body[i].startswith("$ "):
            assert steps, f"README.md:{first + i}: output before any command: {body[i]!r}"
            steps[-1].output.append(body[i])
            i += 1
            continue
        line, command = first + i, body[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + body[i].strip()
        words, comment = split_comment(command)
        steps.append(Step(line, words, comment))
        i += 1
    return steps


def read_session(text: str) -> Session:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    steps: list[Step] = []
    python: list[str] = []
    for lang, first, body in fenced_blocks(lines[start:end], start + 1):
        if lang == "console":
            steps += console_steps(first, body)
        elif lang == "python":
            python.append("\n".join(body))
    return Session(steps, python)


# ---------------------------------------------------------------------- what an output must hold


def shown_words(lines: list[str]) -> list[str]:
    """The words of printed ``lines`` that hold on every machine: table cells without their
    borders, no word with a digit (ids, sizes, times, pids), no size units."""
    return [
        w
        for line in lines
        for w in BOX.sub(" ", line).split()
        if not re.search(r"\d", w) and w not in SIZE_UNITS and "..." not in w
    ]


def missing_in_order(expected: list[str], got: list[str]) -> list[str]:
    """``expected`` words not found in ``got`` in that order (empty: all are)."""
    rest = iter(got)
    for i, word in enumerate(expected):
        if not any(word == w for w in rest):
            return expected[i:]
    return []


def shown_pairs(lines: list[str]) -> list[tuple[str, Any]]:
    """The ``"key":"value"`` (and ``true``/``false``) pairs of a JSON answer as the README shows it
    (abridged with ``...``, so not parsed as a whole), ids left out."""
    pairs = [(k, json.loads(v)) for k, v in JSON_PAIR.findall(" ".join(lines))]
    return [(k, v) for k, v in pairs if not (isinstance(v, str) and ID.match(v))]


def holds_pair(data: Any, key: str, value: Any) -> bool:
    if isinstance(data, dict):
        return (key in data and data[key] == value) or any(holds_pair(v, key, value) for v in data.values())
    if isinstance(data, list):
        return any(holds_pair(v, key, value) for v in data)
    return False


def ids_in(data: Any) -> Iterator[str]:
    """Every ``"id"`` of an answer, in document order."""
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "id" and isinstance(v, str) and ID.match(v):
                yield v
            yield from ids_in(v)
    elif isinstance(data, list):
        for v in data:
            yield from ids_in(v)


# ---------------------------------------------------------------------- curl as an httpx request


@dataclass
class CurlRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: str | None
    stream: bool  # -N: an event stream, read to its end


def curl_request(words: list[str], base: str) -> CurlRequest:
    """The request of a curl command line (the options the README uses: -s, -N, -X, -H, -d), its
    host and port replaced by ``base``'s."""
    assert words[0] == "curl"
    method, url, headers, body, stream = None, None, {}, None, False
    it = iter(words[1:])
    for word in it:
        if word in ("-X", "--request"):
            method = next(it)
        elif word in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data", "--data-raw"):
            body = next(it)
        elif re.fullmatch(r"-[sSN]+", word):
            stream = stream or "N" in word
        elif word.startswith("-"):
            raise AssertionError(f"curl option {word!r} is not one this test knows: teach curl_request")
        else:
            assert url is None, f"two URLs in {shlex.join(words)}"
            url = word
    assert url is not None, f"no URL in {shlex.join(words)}"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    assert parts.port == DEFAULT_PORT, f"{url}: not the port `make run` serves on ({DEFAULT_PORT})"
    target = parts._replace(scheme="http", netloc=urlsplit(base).netloc).geturl()
    return CurlRequest(method or ("POST" if body is not None else "GET"), target, headers, body, stream)


def fill_placeholders(words: list[str], seen: dict[str, str]) -> list[str]:
    """``j-4-...`` replaced by the last id of that kind (``j``) an answer named."""

    def fill(m: re.Match[str]) -> str:
        assert m.group(1) in seen, f"{m.group(0)}: no answer before named an id of that kind"
        return seen[m.group(1)]

    return [PLACEHOLDER.sub(fill, w) for w in words]


# ---------------------------------------------------------------------- the service as `make run` starts it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_run_commands(models: Path, port: int) -> list[list[str]]:
    """The modelkeeper commands ``make run`` would run (``make -n`` prints them without running),
    with this interpreter, ``models`` as the model root, ``port`` and the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "run", f"PY={sys.executable}", f"MODELS={models}",
         f"PORT={port}", "HOST=127.0.0.1", "ARGS=--device cpu"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    commands = [shlex.split(line) for line in out.splitlines() if " -m modelkeeper " in line]
    assert [c[3] for c in commands] == ["demo-models", "serve"], out
    return commands


@dataclass
class Served:
    url: str
    env: dict[str, str]
    folder: Path
    log: Path


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/health/ready`` says so and the first scan has registered the model root."""
    end = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=10) as http:
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < end, f"serve not ready in 120 s:\n{log.read_text()[-3000:]}"
            try:
                if http.get("/health/ready").status_code == 200:
                    scans = http.get("/api/jobs", params={"kind": "scan"}).json()
                    if scans and all(j["state"] == "succeeded" for j in scans):
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.2)


@pytest.fixture
def served(tmp_path: Path, demo: DemoManifest) -> Iterator[Served]:
    port = free_port()
    models = tmp_path / "models"
    demo_models, serve = make_run_commands(models, port)
    # `demo-models MODELS` writes the demo set with write_demo_models, as the `demo` fixture did
    # once for the whole test process: a copy of it is what the command would write, in no time.
    assert demo_models[3:] == ["demo-models", str(models)], demo_models
    shutil.copytree(demo.root, models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELKEEPER_")}
    env |= {
        "MODELKEEPER_DB": str(tmp_path / "registry.sqlite3"),
        "MODELKEEPER_URL": f"http://127.0.0.1:{port}",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(serve, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(env["MODELKEEPER_URL"], proc, log)
        yield Served(env["MODELKEEPER_URL"], env, tmp_path, log)
    finally:
        proc.terminate()  # uvicorn shuts down, then re-raises SIGTERM
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]


def modelkeeper_command() -> list[str]:
    """The venv's ``modelkeeper`` (what ``.venv/bin/modelkeeper`` is in a clone)."""
    script = Path(sys.executable).parent / "modelkeeper"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelkeeper"]


# ---------------------------------------------------------------------- running the steps


def wait_for_fills(http: httpx.Client) -> None:
    """Until every component of every model loaded so far has its segment in the RAM cache (the
    fills beside loads from disk are done)."""
    loads = [
        j["result"]
        for j in http.get("/api/jobs", params={"kind": "load"}).json()
        if j["state"] == "succeeded"
    ]
    wanted = {r["model_id"]: len(r.get("sources") or {}) for r in loads}
    end = time.monotonic() + 60
    while True:
        segments = http.get("/api/model/cache").json()["segments"]
        short = {m: n for m, n in wanted.items() if sum(m in s["models"] for s in segments) < n}
        if not short:
            return
        assert time.monotonic() < end, f"segments of {short} not filled in 60 s"
        time.sleep(0.1)


def run_cli(step: Step, served: Served) -> None:
    assert step.words[0].endswith("/modelkeeper"), f"{step}: not the venv's modelkeeper"
    done = subprocess.run(
        modelkeeper_command() + step.words[1:],
        env=served.env, cwd=served.folder, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    printed = done.stdout + done.stderr
    assert done.returncode == 0, f"{step}: exit {done.returncode}\n{printed}"
    missing = missing_in_order(shown_words(step.output), shown_words(printed.splitlines()))
    assert not missing, f"{step}: the README shows {missing} (in that order), it printed:\n{printed}"


def run_curl(step: Step, http: httpx.Client, served: Served, seen: dict[str, str]) -> None:
    req = curl_request(fill_placeholders(step.words, seen), served.url)
    code = re.match(r"(\d{3})\b", step.comment)
    expected = int(code.group(1)) if code else 200
    with http.stream(req.method, req.url, headers=req.headers, content=req.body, timeout=60) as response:
        body = response.read().decode()
    assert response.status_code == expected, f"{step}: HTTP {response.status_code}, not {expected}\n{body}"
    if req.stream:
        assert response.headers["content-type"].startswith("text/event-stream"), f"{step}: {response.headers}"
        assert "event:" in body, f"{step}: no event in\n{body}"
        return
    answer = json.loads(body)
    seen.update({i[0]: i for i in ids_in(answer)})
    missing = [pair for pair in shown_pairs(step.output) if not holds_pair(answer, *pair)]
    assert not missing, f"{step}: the README shows {missing}, the answer was\n{body}"


def run_python(code: str, served: Served) -> None:
    script = served.folder / "readme_example.py"
    script.write_text(code.replace(DEFAULT_URL, served.url))
    done = subprocess.run([sys.executable, str(script)], env=served.env, cwd=served.folder,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, f"README's python block: exit {done.returncode}\n{done.stdout}{done.stderr}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_the_readme_session_runs_as_written(served: Served) -> None:
    session = read_session(README.read_text())
    make, *steps = session.steps
    assert make.words == ["make", "run"], f"{make}: the session starts with `make run`"
    printed = served.log.read_text()
    missing = missing_in_order(shown_words(make.output[:1])[:3], printed.split())  # its first words
    assert not missing, f"{make}: it printed {printed!r}"
    seen: dict[str, str] = {}
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for step in steps:
            wait_for_fills(http)
            if step.words[0] == "curl":
                run_curl(step, http, served, seen)
            else:
                run_cli(step, served)
        wait_for_fills(http)
        for code in session.python:
            run_python(code, served)


# ---------------------------------------------------------------------- the reading itself


def test_the_session_is_read_from_the_readme() -> None:
    session = read_session(README.read_text())
    kinds = [s.words[0].rsplit("/", 1)[-1] for s in session.steps]
    assert kinds[0] == "make" and "modelkeeper" in kinds and "curl" in kinds, kinds
    assert session.python and "Client(" in session.python[0]
    curls = [s for s in session.steps if s.words[0] == "curl"]
    assert all(s.comment or s.output for s in curls), "every curl line says what it answers"


def test_console_steps_join_lines_and_keep_comments_and_output() -> None:
    body = [
        "$ curl -s -X POST localhost:8765/a \\",
        "       -H 'content-type: application/json' -d '{\"x\": \"#1\"}'   # 202 and a job",
        '{"job":{"id":"j-3-ec2ac9","state":"queued"}}',
        "$ .venv/bin/modelkeeper unload tiny   # by handle",
        "unloaded m-10f618e7d0e6 from cpu: 28.5 MB freed",
    ]
    curl, cli = console_steps(10, body)
    assert curl.line == 10 and curl.comment == "202 and a job" and len(curl.output) == 1
    req = curl_request(curl.words, "http://127.0.0.1:4242")
    assert req == CurlRequest(
        "POST", "http://127.0.0.1:4242/a", {"content-type": "application/json"}, '{"x": "#1"}', False
    )
    assert shown_pairs(curl.output) == [("state", "queued")]  # the job id differs per run
    assert cli.line == 13 and cli.words == [".venv/bin/modelkeeper", "unload", "tiny"]
    assert shown_words(cli.output) == ["unloaded", "from", "cpu:", "freed"]
    assert shown_words(["┏━━━━┳━━━┓", "┃ device ┃ pid ┃", "│ cpu    │ 219 │"]) == ["device", "pid", "cpu"]
    assert fill_placeholders(["localhost:8765/api/jobs/j-4-.../events"], {"j": "j-9-abc"}) == [
        "localhost:8765/api/jobs/j-9-abc/events"
    ]


def test_output_words_are_checked_in_order() -> None:
    printed = shown_words(["load j-1: started", "loaded x m-1 on cpu (unet from ram, vae from", "disk)"])
    assert missing_in_order(["loaded", "on", "(unet", "from", "ram,"], printed) == []
    assert missing_in_order(["loaded", "(unet", "from", "ram,", "vae", "from", "ram)"], printed) == ["ram)"]
    with pytest.raises(AssertionError, match="--fail"):
        curl_request(["curl", "--fail", "localhost:8765/x"], "http://127.0.0.1:1")


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_every_link_is_to_a_file_of_the_clone(doc: Path) -> None:
    """A relative link (``[x](docs/SERVICE.md)``, an image) or a quoted ``../`` path names a file
    of the repository (the README once sent readers to ``../shared/DESIGN.md``, outside it)."""
    text = doc.read_text()
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text) + re.findall(r"`(\.\./[^`\s]+)`", text)
    broken = [
        t
        for t in targets
        if "://" not in t
        and not t.startswith("mailto:")
        and not ((doc.parent / t).exists() and (doc.parent / t).resolve().is_relative_to(ROOT))
    ]
    assert not broken, f"{doc.relative_to(ROOT)}: links to {broken}, which a clone does not have"
