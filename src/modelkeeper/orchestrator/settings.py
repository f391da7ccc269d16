"""Every knob of the service in one typed object.

Values come from, in order of precedence: arguments, environment variables with the prefix
``MODELKEEPER_`` (``MODELKEEPER_PORT=9000``; a list as JSON or comma-separated:
``MODELKEEPER_MODEL_ROOTS='["/models"]'`` or ``MODELKEEPER_DEVICES=cuda:0,cuda:1``; a size in bytes
or with a unit: ``MODELKEEPER_RAM_CACHE_BYTES=8GB``), a TOML file named by ``MODELKEEPER_CONFIG``
(or ``--config``), then the defaults below. :func:`settings_problem` says what is wrong with a
value in words that name the variable or the file it came from.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from modelkeeper.sizes import parse_size

CONFIG_ENV = "MODELKEEPER_CONFIG"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Preload(BaseModel):
    """A model to load when the service starts: ``{model = "tiny-sdxl", device = "cuda:1"}``."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="Id, name, path or hash prefix.")
    device: str | None = Field(None, description="The device; placement chooses when omitted.")


class Settings(BaseSettings):
    """The orchestrator's settings; see the module docstring for where they come from."""

    model_config = SettingsConfigDict(env_prefix="MODELKEEPER_", extra="forbid", validate_default=True)

    # ---------------------------------------------------------------- API
    host: str = Field("127.0.0.1", description="Address the API binds; anything but loopback needs a token.")
    port: int = Field(8765, ge=0, le=65535)
    token: SecretStr | None = Field(None, description="Bearer token every API request must carry.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host header values accepted (DNS-rebinding guard); loopback names and the bind host "
        "are always accepted; '*' accepts any.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (none by default)."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the service's log on stderr (``serve --log-level``)."
    )
    access_log: bool = Field(
        False,
        description="Log every HTTP request, one line each (``serve --access-log``); off by default: a "
        "dashboard's polling would fill the log and each line costs time.",
    )

    # ---------------------------------------------------------------- models and registry
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path("models")])
    db: Path | None = Field(
        None, description="Registry file (default: $MODELKEEPER_DB or ~/.local/share/...)."
    )
    scan_on_start: bool = True
    hash_on_start: bool = Field(True, description="Hash new files in the background after a scan.")
    allow_outside_roots: bool = Field(
        False,
        description="Follow symlinks that leave the model roots, and serve models that lie outside them "
        "(the registry's entries of other folders).",
    )
    watch: bool = Field(
        True,
        description="Watch the model roots: added, moved and removed files are registered within seconds.",
    )
    watch_debounce_ms: int = Field(
        800, ge=50, le=60_000, description="How long the watcher gathers changes before it rescans."
    )
    scan_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads reading model headers during a scan: one is fastest on local disks, "
        "more help on network storage (NFS, SMB).",
    )

    # ---------------------------------------------------------------- RAM cache
    ram_cache_bytes: int | None = Field(
        None, ge=0, description="RAM cache budget (default: half the free RAM)."
    )
    cache_loads: bool = Field(True, description="Load through the RAM cache (segments shared by workers).")
    cache_fill: Literal["alongside", "before"] = Field(
        "alongside",
        description="A load of a component not yet cached: 'alongside' reads it from disk while its "
        "segment fills beside the worker's read (one pass over the disk; the next load hits); "
        "'before' fills the segment first and loads from it.",
    )

    # ---------------------------------------------------------------- workers
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="Devices to run a worker on: 'auto' (every CUDA device, else the CPU), 'cpu', 'cuda:N'. "
        "A device named twice gets two workers (cpu:0, cpu:1).",
    )
    worker_budget_mb: float | None = Field(None, ge=0, description="Cap on what models may use per worker.")
    worker_reserve_mb: float | None = Field(None, ge=0, description="Memory each worker keeps free for work.")
    worker_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra worker arguments."
    )
    worker_warm: bool = Field(
        True, description="Workers import their libraries at start, not at the first load."
    )
    worker_start_timeout: float = Field(180.0, gt=0)
    worker_max_restarts: int = Field(
        5, ge=0, description="Restarts within restart_window_s before giving up."
    )
    restart_window_s: float = Field(300.0, gt=0)
    ping_timeout: float = Field(10.0, gt=0, description="A worker silent this long after a timeout is hung.")
    status_poll_s: float = Field(2.0, gt=0, description="How often worker memory is refreshed.")

    # ---------------------------------------------------------------- operations
    request_timeout: float = Field(
        600.0, gt=0, description="Default time limit of one operation, queue included."
    )
    lease_ttl: float = Field(300.0, gt=0, description="Default lease lifetime in seconds.")
    jobs_kept: int = Field(1000, ge=10, description="Finished jobs remembered.")
    hub_endpoint: str | None = Field(
        None, description="Hugging Face Hub for installs (default: $HF_ENDPOINT, else huggingface.co)."
    )
    civitai_endpoint: str | None = Field(
        None, description="CivitAI for installs (default: $CIVITAI_ENDPOINT, else civitai.com)."
    )
    keep_alive: float = Field(
        -1.0,
        ge=-1,
        description="Seconds a loaded model stays after its last use (as Ollama's keep_alive): 0 unloads it "
        "as soon as no operation or lease holds it, -1 never. A load may ask for its own.",
    )
    preload: Annotated[list[Preload | str], NoDecode] = Field(
        default_factory=list,
        description="Models to load at start (and keep loaded): a reference (id, name, path, hash prefix) "
        "or {model, device}. /health/ready answers ready once every one is loaded.",
    )

    @field_validator("allowed_hosts", "cors_origins", "model_roots", "devices", "worker_args", "preload",
                     mode="before")  # fmt: skip
    @classmethod
    def _list(cls, v: Any) -> Any:
        """A list from the environment: JSON (``["a", "b"]``) or comma-separated (``a,b``)."""
        if not isinstance(v, str):
            return v
        if v.lstrip().startswith("["):
            try:
                return json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f'not a JSON list ({exc.msg}); write ["a", "b"] or a,b') from None
        return [part.strip() for part in v.split(",") if part.strip()]

    @field_validator("ram_cache_bytes", "max_body_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        """Bytes, or a size with its unit: ``8GB``, ``512MiB``."""
        return parse_size(v) if isinstance(v, str) and v.strip() else v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one device")
        for d in v:
            if d not in {"auto", "cpu"} and not (d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
                raise ValueError(f"device {d!r}: expected auto, cpu, cuda or cuda:N")
        return v

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuse to serve beyond this machine without a token."""
        if not self.loopback and self.token is None:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set a bearer token "
                "(MODELKEEPER_TOKEN or --token) before serving on the network"
            )

    def host_allowlist(self) -> list[str]:
        hosts = [*LOOPBACK_NAMES, "[::1]", self.host, *self.allowed_hosts]
        return list(dict.fromkeys(hosts))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def public(self) -> dict[str, Any]:
        """The settings as shown by the API (the token hidden)."""
        out = self.model_dump(mode="json")
        out["token"] = "***" if self.token is not None else None
        return out


_SETTINGS_ERROR_FIELD = re.compile(r'field "(\w+)"')


def settings_problem(exc: ValidationError | SettingsError) -> str:
    """What is wrong with the settings, one line per value, each naming where the value came from
    (``config.toml: unknown setting 'model_root' (did you mean 'model_roots'?)``,
    ``MODELKEEPER_RAM_CACHE_BYTES: ...``), with no pydantic internals."""
    if isinstance(exc, SettingsError):
        match = _SETTINGS_ERROR_FIELD.search(str(exc))
        field = match.group(1) if match else ""
        return f"{_origin(field)}: {exc.__cause__ or exc}" if field else str(exc)
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(Settings.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{_config_name()}: unknown setting {field!r}{hint}")
            continue
        msg = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{_origin(field)}: {msg}" + (f" (got {error['input']!r})" if _shown(error) else ""))
    return "\n".join(lines)


#: ``MODELKEEPER_*`` variables read elsewhere than :class:`Settings` (whose fields the CLI reads too:
#: the token, the registry file): the CLI's URL, the settings file, the worker's knobs, the tests'
#: and benchmarks' (``tests/test_env_names.py`` holds this list equal to the names the source reads).
OTHER_ENV = frozenset({
    "MODELKEEPER_URL", CONFIG_ENV, "MODELKEEPER_STREAM_POOL_MB", "MODELKEEPER_STAGE_CHUNK_MB",
    "MODELKEEPER_READ_THREADS", "MODELKEEPER_CHROMIUM", "MODELKEEPER_PICKLE_CHILD_TEST_SLEEP",
    "MODELKEEPER_SCAN_HOLD_AFTER",
})  # fmt: skip
#: Variables with this prefix belong to cluster mode's settings (``cluster/settings.py``).
CLUSTER_ENV_PREFIX = "MODELKEEPER_CLUSTER_"


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``MODELKEEPER_*`` variable of ``environ`` that nothing reads (a typo: the
    model root without its s), with the closest known name: a variable ignored in silence leaves the
    user wondering why the setting did not take."""
    known = {f"MODELKEEPER_{name.upper()}" for name in Settings.model_fields} | OTHER_ENV
    lines = []
    for name in sorted(environ):
        if not name.startswith("MODELKEEPER_") or name in known or name.startswith(CLUSTER_ENV_PREFIX):
            continue
        suffixes = {k.removeprefix("MODELKEEPER_"): k for k in known}  # the shared prefix is no likeness
        close = difflib.get_close_matches(name.removeprefix("MODELKEEPER_"), sorted(suffixes), n=1)
        hint = f" (did you mean {suffixes[close[0]]}?)" if close else ""
        lines.append(f"{name}: not a modelkeeper setting, ignored{hint}")
    return lines


def _shown(error: Any) -> bool:
    value = error.get("input")
    return isinstance(value, (str, int, float)) and str(value) not in str(error["msg"])


def _config_name() -> str:
    return os.environ.get(CONFIG_ENV) or "the settings file"


def _origin(field: str) -> str:
    """Where ``field``'s value came from: its environment variable, else the TOML file, else the
    command line's option."""
    env = f"MODELKEEPER_{field.upper()}"
    if env in os.environ:
        return env
    if os.environ.get(CONFIG_ENV):
        return f"{_config_name()}: {field}"
    return f"--{field.replace('_', '-')}" if field else "settings"
