"""Sandbox child of ``modelkeeper.formats.pickle_sandbox``: load one checkpoint under limits.

Started only by ``pickle_runner`` (gate 3 of ``pickle_sandbox``) as ``python -I <this file>``
(isolated: no environment variables, no user site, no script folder on ``sys.path``) with
``cwd=/`` and a minimal environment. It imports only the standard library and torch, never modelkeeper, so it behaves
the same however the package is installed.

Protocol: one JSON request on stdin (``op`` "inspect" or "convert", ``path``, ``dest``,
``format``, the zip ``records`` and ``data_pkl_sha256`` the parent scanned, limits and the dtype
table); one JSON result written to the original stdout, which is the only thing written there
(fd 1 is pointed at stderr before anything else runs):
``{"ok": true, "tensors": [[name, torch_dtype, shape], ...], "non_tensor_keys": [...]}`` or
``{"ok": false, "kind": "unsafe" | "invalid" | "unsupported" | "memory", "message": ...}``.

Order of work: CPU limit; import torch and refuse torch < 2.10; for a zip archive, check with
torch's own reader that it sees exactly the scanned members and data.pkl bytes; address-space
and file-size limits; ``torch.load(weights_only=True, mmap=<zip>, map_location="cpu")``;
flatten nested containers; for "convert", stream a safetensors file to ``dest``.

Test hook: if ``MODELKEEPER_PICKLE_CHILD_TEST_SLEEP`` is set to a number of seconds, the child
sleeps that long after setting its limits and before loading, so tests can exercise the
parent's wall-clock timeout. It only delays; it changes nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import struct
import sys
import time
from typing import Any

MIN_TORCH = (2, 10)
_TEST_SLEEP_ENV = "MODELKEEPER_PICKLE_CHILD_TEST_SLEEP"
_MAX_DEPTH = 64


class ChildError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_torch_version(version: str) -> None:
    """Refuse torch older than ``MIN_TORCH``, whose ``weights_only`` loader is weaker."""
    parts = version.split("+", maxsplit=1)[0].split(".")
    try:
        found = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise ChildError("unsupported", f"cannot parse the torch version {version!r}") from None
    if found < MIN_TORCH:
        raise ChildError(
            "unsupported",
            f"torch {version} is too old: the pickle sandbox needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}",
        )


def _set_limit(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a resource limit; never raise one above its current hard limit."""
    infinity = resource.RLIM_INFINITY

    def lower(a: int, b: int) -> int:
        if a == infinity:
            return b
        if b == infinity:
            return a
        return min(a, b)

    _, current_hard = resource.getrlimit(which)
    new_hard = lower(current_hard, infinity if hard is None else hard)
    resource.setrlimit(which, (lower(soft, new_hard), new_hard))


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _check_records(torch: Any, request: dict[str, Any]) -> None:
    """torch's zip reader must see the members and the data.pkl the parent scanned."""
    reader = torch._C.PyTorchFileReader(request["path"])
    records = sorted(reader.get_all_records())
    if records != sorted(request["records"]):
        raise ChildError("unsafe", "torch's zip reader sees different members than the scanner did")
    digest = hashlib.sha256(bytes(reader.get_record("data.pkl"))).hexdigest()
    if digest != request["data_pkl_sha256"]:
        raise ChildError("unsafe", "torch's zip reader sees a different data.pkl than the scanner did")


def _load(torch: Any, request: dict[str, Any]) -> Any:
    is_zip = request["format"] == "torch_zip"
    try:
        return torch.load(request["path"], weights_only=True, mmap=is_zip, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ChildError("unsafe", f"the restricted unpickler refused it: {_first_line(exc)}") from None
    except MemoryError:
        raise ChildError("memory", "the load needed more memory than allowed") from None
    except RuntimeError as exc:
        text = str(exc)
        if "can't allocate memory" in text or "not enough memory" in text.lower():
            raise ChildError("memory", _first_line(exc)) from None
        raise ChildError("invalid", f"torch cannot load it: {_first_line(exc)}") from None
    except Exception as exc:
        raise ChildError(
            "invalid", f"torch cannot load it: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool | int | float) or key is None:
        return str(key)
    raise ChildError("unsupported", f"a dict key of type {type(key).__name__} cannot name a tensor")


def flatten(torch: Any, obj: Any) -> tuple[list[tuple[str, Any]], list[str]]:
    """Tensors of nested dicts/lists by dotted name, and the names of the other leaves.

    A container without any tensor is reported as one non-tensor key.
    """
    if not isinstance(obj, dict):
        raise ChildError("unsupported", f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    tensors: list[tuple[str, Any]] = []
    others: list[str] = []

    def walk(value: Any, name: str, depth: int) -> bool:
        if depth > _MAX_DEPTH:
            raise ChildError("invalid", f"containers nested deeper than {_MAX_DEPTH} levels at {name!r}")
        if isinstance(value, torch.Tensor):
            tensors.append((name, value))
            return True
        if isinstance(value, dict):
            items = [(_key(k), v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            others.append(name)
            return False
        mark = len(others)
        found = False
        for key, item in items:
            found |= walk(item, f"{name}.{key}" if name else key, depth + 1)
        if not found and name:
            del others[mark:]
            others.append(name)
        return found

    walk(obj, "", 0)
    seen: set[str] = set()
    for name, _ in tensors:
        if name in seen:
            raise ChildError("invalid", f"two tensors flatten to the same name {name!r}")
        seen.add(name)
    return tensors, others


def _check_tensor(torch: Any, name: str, tensor: Any, dtype_names: dict[str, str]) -> None:
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
        raise ChildError("unsupported", f"tensor {name!r} is not a plain dense CPU tensor")
    if str(tensor.dtype) not in dtype_names:
        raise ChildError(
            "unsupported", f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store"
        )


def write_safetensors(
    torch: Any, tensors: list[tuple[str, Any]], dest: str, dtype_names: dict[str, str]
) -> None:
    """Stream ``tensors`` into a new safetensors file (header first, then each tensor's bytes)."""
    if sys.byteorder != "little":
        raise ChildError("unsupported", "conversion needs a little-endian machine")
    # Largest element first, then by name, as safetensors orders them: keeps every tensor aligned.
    ordered = sorted(tensors, key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_names[str(tensor.dtype)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ChildError("invalid", "a tensor name is not valid UTF-8") from None
    raw += b" " * (-len(raw) % 8)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, tensor in ordered:
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(flat.numpy()))
        f.flush()
        os.fsync(f.fileno())


def run(request: dict[str, Any]) -> dict[str, Any]:
    _set_limit(resource.RLIMIT_CPU, request["cpu_seconds"], request["cpu_seconds"] + 5)
    # The parent scanned this open file and handed it down: load the same inode, by its fd.
    fd = int(request["fd"])
    request["path"] = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"
    import torch

    check_torch_version(torch.__version__)
    torch.set_num_threads(1)
    is_zip = request["format"] == "torch_zip"
    if is_zip:
        _check_records(torch, request)
    file_size = os.fstat(fd).st_size
    # The mmap of a zip archive is address space, not allocation: do not count it against the limit.
    budget = _address_space() + request["memory_limit"] + (file_size if is_zip else 0)
    _set_limit(resource.RLIMIT_AS, budget)
    _set_limit(resource.RLIMIT_FSIZE, request["max_output_bytes"] if request["op"] == "convert" else 0)
    sleep = os.environ.get(_TEST_SLEEP_ENV)
    if sleep:
        time.sleep(float(sleep))

    obj = _load(torch, request)
    tensors, others = flatten(torch, obj)
    dtype_names: dict[str, str] = request["dtype_names"]
    for name, tensor in tensors:
        _check_tensor(torch, name, tensor, dtype_names)
    if request["op"] == "convert":
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        if total > request["max_output_bytes"]:
            raise ChildError(
                "invalid",
                f"tensors hold {total} bytes, far more than the file's size (views blown up by strides?)",
            )
        try:
            write_safetensors(torch, tensors, request["dest"], dtype_names)
        except MemoryError:
            raise ChildError("memory", "writing needed more memory than allowed") from None
        except RuntimeError as exc:
            kind = "memory" if "can't allocate memory" in str(exc) else "invalid"
            raise ChildError(kind, f"cannot write the converted file: {_first_line(exc)}") from None
    return {
        "ok": True,
        "tensors": [[name, str(t.dtype), list(t.shape)] for name, t in tensors],
        "non_tensor_keys": others,
    }


def main() -> int:
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever else gets printed goes to stderr, never into the result
    try:
        request = json.loads(sys.stdin.buffer.read())
        result = run(request)
    except ChildError as exc:
        result = {"ok": False, "kind": exc.kind, "message": str(exc)}
    except MemoryError:
        result = {"ok": False, "kind": "memory", "message": "out of memory"}
    except Exception as exc:
        result = {"ok": False, "kind": "invalid", "message": f"{type(exc).__name__}: {_first_line(exc)}"}
    with os.fdopen(result_fd, "wb") as out:
        out.write(json.dumps(result, ensure_ascii=True).encode("ascii"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
