"""Gate 3 of the pickle sandbox, the parent's side: load a scanned checkpoint in a sandboxed child.

A fresh interpreter (``python -I`` on the file of ``_pickle_child``, which imports no modelkeeper)
with CPU, address-space and file-size limits and a wall-clock timeout runs
``torch.load(weights_only=True)`` on the very file that was scanned (its open descriptor is handed
down). It answers with one JSON document, which this side validates strictly into a
``PickleInspection``; a converted file is re-validated with the safetensors header parser.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from modelkeeper.formats.errors import FormatError, InvalidModelFile, UnsafePickle, UnsupportedFormat
from modelkeeper.formats.pickle_allowlist import TORCH_TO_SAFETENSORS_DTYPE
from modelkeeper.formats.pickle_layout import PickleScan
from modelkeeper.formats.safetensors_header import read_header

__all__ = [
    "TEST_SLEEP_ENV",
    "PickleInspection",
    "PickleTensor",
    "run_child",
    "to_inspection",
    "verify_converted",
]

#: Largest child result accepted (JSON).
MAX_RESULT_BYTES: Final = 512 * 1024 * 1024
_CHILD_SCRIPT = Path(__file__).with_name("_pickle_child.py")
#: Test hook passed through to the child: seconds to sleep before loading (see ``_pickle_child``).
TEST_SLEEP_ENV: Final = "MODELKEEPER_PICKLE_CHILD_TEST_SLEEP"


@dataclass(frozen=True)
class PickleTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PickleInspection:
    """What a checkpoint holds: tensors by flattened name (nested dict keys joined by ``.``) and
    the flattened names of everything else (``global_step``, ``epoch``, ...)."""

    path: Path
    tensors: dict[str, PickleTensor]
    non_tensor_keys: list[str]
    format: str


def run_child(
    scan: PickleScan, f: IO[bytes], *, op: str, dest: Path | None, timeout: float, memory_limit: int
) -> dict[str, Any]:
    """Run ``op`` ("inspect" or "convert" to ``dest``) on the scanned open file ``f`` in a sandboxed
    child; its answer, checked only for being a well-formed success (see ``to_inspection``)."""
    if timeout <= 0 or memory_limit <= 0:
        raise ValueError("timeout and memory_limit_bytes must be positive")
    fd = f.fileno()
    file_size = os.fstat(fd).st_size
    request = {
        "op": op,
        "fd": fd,
        "dest": str(dest) if dest is not None else None,
        "format": scan.format,
        "records": list(scan.records),
        "data_pkl_sha256": scan.data_pkl_sha256,
        "memory_limit": int(memory_limit),
        "cpu_seconds": int(timeout) + 10,
        # A stride-0 tensor can claim terabytes from a few bytes of storage: cap the output.
        "max_output_bytes": 2 * file_size + 64 * 1024 * 1024,
        "dtype_names": TORCH_TO_SAFETENSORS_DTYPE,
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    if TEST_SLEEP_ENV in os.environ:
        env[TEST_SLEEP_ENV] = os.environ[TEST_SLEEP_ENV]
    with _spawn_child(env, fd) as child:
        try:
            stdout, stderr = child.communicate(json.dumps(request).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(child)
            raise InvalidModelFile(
                f"{scan.path}: loading timed out after {timeout:g} s; the sandbox process was killed",
                path=str(scan.path),
                timeout=timeout,
            ) from None
    return _parse_result(scan.path, child.returncode, stdout, stderr)


@contextlib.contextmanager
def _spawn_child(env: dict[str, str], fd: int) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(
        [sys.executable, "-I", "-X", "utf8", str(_CHILD_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        start_new_session=True,
        close_fds=True,
        pass_fds=(fd,),
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            _kill(child)


def _kill(child: subprocess.Popen[bytes]) -> None:
    # The child leads its own session: kill the group so nothing it started outlives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    child.communicate()


def _parse_result(path: Path, returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    tail = stderr[-600:].decode("utf-8", "replace").strip()
    if returncode < 0:
        sig = -returncode
        reason = {
            int(signal.SIGXCPU): "ran out of its CPU time limit",
            int(signal.SIGXFSZ): "exceeded its output size limit",
            int(signal.SIGKILL): "was killed (CPU or memory limit)",
            int(signal.SIGSEGV): "crashed",
        }.get(sig, f"died of signal {sig}")
        raise InvalidModelFile(f"{path}: the sandbox process {reason}", path=str(path), signal=sig)
    if len(stdout) > MAX_RESULT_BYTES:
        raise InvalidModelFile(f"{path}: the sandbox process answered too much", path=str(path))
    try:
        result = json.loads(stdout.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise InvalidModelFile(
            f"{path}: the sandbox process exited {returncode} without a result: {tail[-300:]}", path=str(path)
        ) from None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        raise InvalidModelFile(f"{path}: malformed result from the sandbox process", path=str(path))
    if result["ok"]:
        return result
    kind, message = result.get("kind"), result.get("message")
    if not isinstance(kind, str) or not isinstance(message, str):
        raise InvalidModelFile(f"{path}: malformed error from the sandbox process", path=str(path))
    message = message[:1000]
    error: type[FormatError] = {
        "unsafe": UnsafePickle,
        "unsupported": UnsupportedFormat,
    }.get(kind, InvalidModelFile)
    prefix = "ran out of memory: " if kind == "memory" else ""
    raise error(f"{path}: {prefix}{message}", path=str(path))


def _no_constant(token: str) -> Any:
    raise ValueError(token)


def to_inspection(scan: PickleScan, result: dict[str, Any]) -> PickleInspection:
    """The child's successful ``result``, validated strictly: it is data from a process that read a hostile file."""
    path = scan.path
    raw_tensors, raw_others = result.get("tensors"), result.get("non_tensor_keys")
    if not isinstance(raw_tensors, list) or not isinstance(raw_others, list):
        raise InvalidModelFile(f"{path}: malformed result from the sandbox process", path=str(path))
    tensors: dict[str, PickleTensor] = {}
    for item in raw_tensors:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], list)
            and all(type(d) is int and d >= 0 for d in item[2])
            and _is_text(item[0])
        ):
            raise InvalidModelFile(f"{path}: malformed tensor entry from the sandbox process", path=str(path))
        name, torch_dtype, shape = item
        if name in tensors:
            raise InvalidModelFile(
                f"{path}: tensor name {name!r} appears twice after flattening", path=str(path)
            )
        dtype = TORCH_TO_SAFETENSORS_DTYPE.get(torch_dtype)
        if dtype is None:
            raise UnsupportedFormat(
                f"{path}: tensor {name!r} has dtype {torch_dtype[:40]}, which safetensors cannot store",
                path=str(path),
                tensor=name,
            )
        tensors[name] = PickleTensor(name=name, dtype=dtype, shape=tuple(shape))
    if not all(isinstance(key, str) and _is_text(key) for key in raw_others):
        raise InvalidModelFile(f"{path}: malformed key list from the sandbox process", path=str(path))
    return PickleInspection(path=path, tensors=tensors, non_tensor_keys=list(raw_others), format=scan.format)


def _is_text(value: str) -> bool:
    """False for strings holding lone surrogates (JSON escapes can carry them), which no file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def verify_converted(source: Path, written: Path, inspection: PickleInspection) -> None:
    """The file the child ``written`` must hold exactly the inspected tensors (read back by the header parser)."""
    header = read_header(written)
    expected = {(t.name, t.dtype, t.shape) for t in inspection.tensors.values()}
    actual = {(i.name, i.dtype, i.shape) for i in header.tensors.values()}
    if expected != actual:
        raise InvalidModelFile(
            f"{source}: the converted file does not match the inspected tensors", path=str(source)
        )
