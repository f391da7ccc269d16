"""Builders of hostile and malformed model files, written into a test's tmp dir at test time.

Nothing malicious is committed as a binary: payload pickles are assembled here from opcodes (or
from ``__reduce__`` classes) when a test asks for them. Every payload, if it were ever
executed, would only create a file inside the ``marker_dir`` it is given; the tests assert that
folder stays empty.

Opcode helpers follow ``pickletools``' names; expressions are byte strings that leave one value
on the pickle stack.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import sys
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# --- safetensors -------------------------------------------------------------------------------


def write_safetensors_raw(path: Path, header: dict[str, Any] | bytes, data_size: int) -> Path:
    """A file with ``header`` (a dict, JSON-encoded here, or raw bytes) and ``data_size`` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)
    return path


# --- pickle opcode assembly --------------------------------------------------------------------

STOP = b"."
MARK = b"("
POP = b"0"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
NONE = b"N"


def proto(n: int = 2) -> bytes:
    return b"\x80" + bytes([n])


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + b"t"


def lst(*items: bytes) -> bytes:
    return EMPTY_LIST + MARK + b"".join(items) + b"e"


def dct(*pairs: tuple[bytes, bytes]) -> bytes:
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in pairs) + b"u"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def put(index: int) -> bytes:
    return b"q" + bytes([index])


def get(index: int) -> bytes:
    return b"h" + bytes([index])


def whole(expr: bytes, protocol: int = 2) -> bytes:
    """A complete pickle evaluating ``expr``."""
    return proto(protocol) + expr + STOP


# --- payloads ----------------------------------------------------------------------------------


def payloads(marker_dir: Path) -> dict[str, tuple[bytes, str]]:
    """Pickle expressions that would each create a file in ``marker_dir``: name → (expr, the
    global the scanner must name, as ``module.name``)."""

    def target(tag: str) -> str:
        return str(marker_dir / tag)

    def shell(tag: str) -> str:
        return f"touch {target(tag)}"

    def python(tag: str) -> str:
        return f"open({target(tag)!r}, 'w').close()"

    bait = marker_dir.parent / "bait.txt"  # what the copyfile payload would copy
    if marker_dir.parent.is_dir():  # (the names alone are also asked for, at collection time)
        bait.write_text("bait")

    def then_getattr(first: bytes, attr: str, *args: bytes) -> bytes:
        # first (memoised as 0, then popped), getattr(memo[0], attr)(*args): `first`'s global comes first.
        return first + put(0) + POP + call(call(glob("builtins", "getattr"), get(0), text(attr)), *args)

    return {
        "os.system": (call(glob("os", "system"), text(shell("os_system"))), "os.system"),
        "posix.system": (call(glob("posix", "system"), text(shell("posix_system"))), "posix.system"),
        "builtins.eval": (call(glob("builtins", "eval"), text(python("eval"))), "builtins.eval"),
        "builtins.exec": (call(glob("builtins", "exec"), text(python("exec"))), "builtins.exec"),
        "py2 __builtin__.eval": (
            call(glob("__builtin__", "eval"), text(python("py2eval"))),
            "__builtin__.eval",
        ),
        "builtins.__import__": (
            then_getattr(call(glob("builtins", "__import__"), text("os")), "system", text(shell("import"))),
            "builtins.__import__",
        ),
        "importlib.import_module": (
            then_getattr(
                call(glob("importlib", "import_module"), text("os")), "system", text(shell("import_module"))
            ),
            "importlib.import_module",
        ),
        "subprocess.Popen": (
            call(glob("subprocess", "Popen"), lst(text("touch"), text(target("popen")))),
            "subprocess.Popen",
        ),
        "shutil.copyfile": (
            call(glob("shutil", "copyfile"), text(str(bait)), text(target("copyfile"))),
            "shutil.copyfile",
        ),
        "operator.attrgetter": (
            call(
                call(glob("operator", "attrgetter"), text("system")),
                call(glob("importlib", "import_module"), text("os")),
            )
            + tup(text(shell("attrgetter")))
            + b"R",
            "operator.attrgetter",
        ),
        "functools.partial": (
            call(glob("functools", "partial"), glob("os", "system"), text(shell("partial")))
            + EMPTY_TUPLE
            + b"R",
            "functools.partial",
        ),
        "pydoc.locate": (
            call(call(glob("pydoc", "locate"), text("os.system")), text(shell("pydoc"))),
            "pydoc.locate",
        ),
        "code.InteractiveInterpreter": (
            then_getattr(
                glob("code", "InteractiveInterpreter") + EMPTY_TUPLE + b"R", "runsource", text(python("code"))
            ),
            "code.InteractiveInterpreter",
        ),
        "torch.save": (call(glob("torch", "save"), integer(0), text(target("torch_save"))), "torch.save"),
        "torch.serialization.load": (
            call(glob("torch.serialization", "load"), text(target("nothing"))),
            "torch.serialization.load",
        ),
        "numpy.save": (
            call(glob("numpy", "save"), text(target("numpy_save")), lst(integer(1))),
            "numpy.save",
        ),
    }


class ReducePayload:
    """An object whose pickle runs ``os.system(command)`` when loaded (pickled as ``posix.system``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def reduce_payload_pickle(marker_dir: Path, protocol: int) -> bytes:
    return pickle.dumps(ReducePayload(f"touch {marker_dir / f'reduce{protocol}'}"), protocol=protocol)


# Globals torch's own weights_only unpickler accepts but the allowlist does not (not payloads).
TORCH_ONLY_GLOBALS = [
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "device"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "bytearray"),
    ("collections", "Counter"),
]


# --- legacy (non-zip) torch files ----------------------------------------------------------------


def legacy_file(
    main: bytes,
    *,
    sys_info: bytes | None = None,
    keys: bytes | None = None,
    magic: int = LEGACY_MAGIC,
    tail: bytes = b"",
) -> bytes:
    """The five pickles of torch's legacy format around ``main`` (a whole pickle), then ``tail``."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (
        pickle.dumps(magic, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + (sys_info if sys_info is not None else pickle.dumps(info, protocol=2))
        + main
        + (keys if keys is not None else pickle.dumps([], protocol=2))
        + tail
    )


def state_dict_with(expr: bytes) -> bytes:
    """A whole pickle of a realistic nested dict hiding ``expr`` next to plain values."""
    return whole(
        dct(
            (text("epoch"), integer(3)),
            (text("global_step"), integer(1200)),
            (text("state_dict"), dct((text("model.alpha"), integer(1)), (text("model.ema_decay"), expr))),
        )
    )


# --- torch zip archives --------------------------------------------------------------------------


def clean_zip(path: Path) -> Path:
    """A real torch.save archive of a small Lightning-style checkpoint (archive folder = path stem)."""
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "state_dict": OrderedDict(
                [("model.w", torch.ones(2, 3)), ("model.b", torch.zeros(3, dtype=torch.float16))]
            ),
        },
        path,
    )
    return path


def rewrite_zip(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    add: list[tuple[zipfile.ZipInfo | str, bytes]] | None = None,
    drop: set[str] | None = None,
    compress: set[str] | None = None,
) -> Path:
    """Copy a zip member by member, replacing, dropping, adding or compressing members (by full name)."""
    replace, add, drop, compress = replace or {}, add or [], drop or set(), compress or set()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some tricks
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.get(info.filename, zin.read(info))
            kind = zipfile.ZIP_DEFLATED if info.filename in compress else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data, compress_type=kind)
        for member, data in add:
            zout.writestr(member, data, compress_type=zipfile.ZIP_STORED)
    return dst


def symlink_member(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o120777) << 16
    return info, target.encode()


def zip_tricks(tmp: Path, marker_dir: Path) -> dict[str, tuple[Path, str]]:
    """Archives that deviate from what torch.save writes: name → (file, expected message part)."""
    src = clean_zip(tmp / "archive.pt")
    data_pkl = zipfile.ZipFile(src).read("archive/data.pkl")
    payload = whole(call(glob("os", "system"), text(f"touch {marker_dir / 'zip'}")))
    tricks: dict[str, tuple[dict[str, Any], str]] = {
        "dotdot-inside": ({"add": [("archive/../evil", payload)]}, "'..'"),
        "dotdot-top": ({"add": [("../evil.pkl", payload)]}, "'..'"),
        "absolute": ({"add": [("/tmp/evil.pkl", payload)]}, "absolute"),
        "backslash": ({"add": [("archive\\..\\evil.pkl", payload)]}, "malformed"),
        "two-data-pkl": ({"add": [("archive/data.pkl", payload)]}, "appears twice"),
        "outside-folder": ({"add": [("other/data.pkl", payload)]}, "top-level folders"),
        "no-folder": ({"add": [("data.pkl", payload)]}, "outside the archive folder"),
        "extra-pickle": ({"add": [("archive/payload.pkl", payload)]}, "not a member torch.save writes"),
        "torchscript-constants": (
            {"add": [("archive/constants.pkl", payload)]},
            "not a member torch.save writes",
        ),
        "symlink": ({"add": [symlink_member("archive/data/7", "/etc/passwd")]}, "symlink"),
        "deflated-data-pkl": ({"compress": {"archive/data.pkl"}}, "compressed"),
        "payload-after-stop": ({"replace": {"archive/data.pkl": data_pkl + payload}}, "after its STOP"),
        "garbage-after-stop": ({"replace": {"archive/data.pkl": data_pkl + b"garbage"}}, "after its STOP"),
        "payload-then-garbage": ({"replace": {"archive/data.pkl": payload + b"\xff" * 64}}, "os.system"),
        "bad-byteorder": ({"replace": {"archive/byteorder": b"middle"}}, "unexpected content"),
    }
    out: dict[str, tuple[Path, str]] = {}
    for name, (edits, expected) in tricks.items():
        out[name] = (rewrite_zip(src, tmp / f"{name}.pt", **edits), expected)
    out["nul-truncated-name"] = (_nul_name_zip(src, tmp / "nul.pt", payload), "malformed")
    return out


def _nul_name_zip(src: Path, dst: Path, payload: bytes) -> Path:
    """A member whose stored name is ``archive/data.pkl\\0x``: Python truncates at the NUL, others may not."""
    rewrite_zip(src, dst, add=[("archive/data/99999", payload)])
    blob = dst.read_bytes().replace(b"archive/data/99999", b"archive/data.pkl\0x")
    dst.write_bytes(blob)
    return dst


# --- other structural garbage --------------------------------------------------------------------


def tar_checkpoint(path: Path, marker_dir: Path) -> Path:
    payload = whole(call(glob("os", "system"), text(f"touch {marker_dir / 'tar'}")))
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "tensors", "storages"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def copy_python_binary_header(path: Path) -> Path:
    """The first 4 KiB of the interpreter binary: not a zip, not a pickle."""
    with open(sys.executable, "rb") as f:
        path.write_bytes(f.read(4096))
    return path


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
