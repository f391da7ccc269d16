"""What the pickle sandbox lets through: the suffixes of pickle-based files, the globals and opcodes a
checkpoint's pickles may use, the dtypes it may hold, and how much pickle is scanned at most.

Data only, read by the static scan (``pickle_opcodes``, ``pickle_layout``) and by the sandboxed
load's parent side (``pickle_runner``); ``pickle_sandbox`` re-exports the public names.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_OPCODES",
    "MAX_PICKLE_BYTES",
    "PICKLE_SUFFIXES",
    "TORCH_TO_SAFETENSORS_DTYPE",
]

#: File suffixes of pickle-based weights, which are only ever read through this sandbox.
PICKLE_SUFFIXES: Final = (".ckpt", ".pt", ".pth", ".bin")

# The legacy typed storages torch.save names for the dtypes below (torch.<Name>Storage).
_STORAGE_CLASSES = [
    "Double",
    "Float",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexFloat",
]

#: torch dtype (as ``str(dtype)``) → safetensors dtype name, for every dtype a checkpoint may hold.
TORCH_TO_SAFETENSORS_DTYPE: Final[dict[str, str]] = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
    "torch.uint16": "U16",
    "torch.uint32": "U32",
    "torch.uint64": "U64",
    "torch.complex64": "C64",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.float8_e4m3fnuz": "F8_E4M3FNUZ",
    "torch.float8_e5m2fnuz": "F8_E5M2FNUZ",
    "torch.float8_e8m0fnu": "F8_E8M0",
}

#: The exact (module, name) pairs a pickle may reference: what ``torch.save`` writes for state
#: dicts and Lightning-style checkpoints of plain values. A subset of what torch's own
#: ``weights_only`` unpickler accepts (no sparse/quantized/nested/meta tensors, no tensor
#: subclasses, no ``_codecs.encode``/``set``/``complex``/``bytearray``, no ``torch.device``).
ALLOWED_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "Size"),
        *(("torch", f"{name}Storage") for name in _STORAGE_CLASSES),
        *(("torch", dtype.removeprefix("torch.")) for dtype in TORCH_TO_SAFETENSORS_DTYPE),
    }
)

#: Opcodes allowed in a pickle: exactly those torch's ``weights_only`` unpickler implements.
ALLOWED_OPCODES: Final[frozenset[str]] = frozenset(
    [
        "PROTO",
        "STOP",
        "GLOBAL",
        "REDUCE",
        "NEWOBJ",
        "BUILD",
        "MARK",
        "APPEND",
        "APPENDS",
        "SETITEM",
        "SETITEMS",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINSTRING",
        "BINPERSID",
        "BINGET",
        "LONG_BINGET",
        "BINPUT",
        "LONG_BINPUT",
    ]
)

#: Largest pickle stream scanned (data.pkl, or the pickles of a legacy file). The scan is pure
#: Python in the caller's thread, a few MB/s; a state dict needs ~110 bytes of pickle per tensor.
MAX_PICKLE_BYTES: Final = 64 * 1024 * 1024
