"""safetensors header parsing: agreement with safetensors itself, and a battery of malformed headers."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound
from modelkeeper.formats.safetensors_header import (
    DTYPE_BITS,
    SafetensorsHeader,
    StructureMemo,
    TensorInfo,
    parse_header,
    read_header,
)
from tests.formats.hostile import write_safetensors_raw

# --- agreement with safetensors on real files ------------------------------------------------

ALL_DTYPES: list[torch.dtype] = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.float4_e2m1fn_x2,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic content of any dtype, built from random bytes."""
    gen = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype is torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _battery() -> list[tuple[str, dict[str, torch.Tensor], dict[str, str] | None]]:
    cases: list[tuple[str, dict[str, torch.Tensor], dict[str, str] | None]] = []
    every = {f"t.{str(dt).removeprefix('torch.')}": _tensor(dt, (3, 5), i) for i, dt in enumerate(ALL_DTYPES)}
    cases.append(("all-dtypes", every, {"format": "pt", "note": "ünïcode ✓"}))
    cases.append(
        (
            "scalars-and-empty",
            {
                "scalar.f32": torch.tensor(1.5),
                "scalar.i64": torch.tensor(7, dtype=torch.int64),
                "empty.f16": torch.zeros((0, 4), dtype=torch.float16),
                "empty.u8": torch.zeros((5, 0, 2), dtype=torch.uint8),
                "empty.bf16": torch.zeros((0,), dtype=torch.bfloat16),
                "w": _tensor(torch.float16, (4, 4), 99),
            },
            None,
        )
    )
    cases.append(("empty-metadata", {"a": torch.ones(2)}, {}))
    cases.append(("no-tensors", {}, {"format": "pt"}))
    cases.append(
        ("many-small", {f"blk.{i}.w": _tensor(torch.float32, (i % 3 + 1, 2), i) for i in range(64)}, None)
    )
    return cases


@pytest.mark.parametrize(("tensors", "metadata"), [c[1:] for c in _battery()], ids=[c[0] for c in _battery()])
def test_agrees_with_safetensors(
    tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    header = read_header(path)

    with safe_open(str(path), "pt") as st:
        assert set(header.tensors) == set(st.keys())
        for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
            sl = st.get_slice(name)
            info = header.tensors[name]
            assert info.dtype == sl.get_dtype(), name
            assert list(info.shape) == sl.get_shape(), name
        assert header.metadata == (st.metadata() or {})

    # The offsets point at the very bytes safetensors wrote for each tensor.
    blob = path.read_bytes()
    assert header.file_size == len(blob)
    assert header.data_offset == 8 + header.header_size
    assert header.data_offset + header.data_size == len(blob)
    for name, tensor in tensors.items():
        info = header.tensors[name]
        stored = blob[header.data_offset + info.begin : header.data_offset + info.end]
        assert stored == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), name
    # In file order.
    begins = [info.begin for info in header.tensors.values()]
    assert begins == sorted(begins)


def test_accessors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(
        {
            "a": torch.zeros(2, 3),
            "b": torch.zeros(4, dtype=torch.float16),
            "c": torch.zeros((), dtype=torch.int8),
        },
        str(path),
    )
    header = read_header(path)
    assert isinstance(header, SafetensorsHeader)
    assert header.total_bytes() == 24 + 8 + 1
    assert header.total_bytes(["a", "c"]) == 25
    assert header.dtypes() == {"F32": 1, "F16": 1, "I8": 1}
    assert header.parameters() == 6 + 4 + 1
    assert header.tensors["c"].shape == ()
    assert header.tensors["c"].numel == 1
    assert header.tensors["a"].nbytes == 24
    with pytest.raises(AttributeError):
        header.tensors["a"].begin = 3  # type: ignore[misc]


# --- valid edge cases written by hand ----------------------------------------------------------


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _parse(header: dict[str, Any] | bytes, data_size: int, name: str = "x.safetensors") -> SafetensorsHeader:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return parse_header(raw, file_size=8 + len(raw) + data_size, path=Path(name))


def test_zero_size_tensors_anywhere() -> None:
    header = _parse(
        {
            "e0": _entry("F32", [0], 0, 0),
            "a": _entry("U8", [4], 0, 4),
            "e1": _entry("F16", [3, 0], 4, 4),
            "e2": _entry("I64", [0, 0], 4, 4),
            "b": _entry("F16", [2], 4, 8),
            "e3": _entry("BF16", [0], 8, 8),
        },
        8,
    )
    assert next(iter(header.tensors)) == "e0"
    assert header.tensors["e1"].nbytes == 0
    assert header.parameters() == 6


def test_padding_whitespace_and_null_metadata_accepted() -> None:
    body = json.dumps({"__metadata__": None, "a": _entry("U8", [2], 0, 2)}).encode()
    header = _parse(b"  \n" + body + b" " * (8 - len(body) % 8 + 8), 2)
    assert header.metadata == {}
    assert header.tensors["a"].shape == (2,)


def test_empty_header_object() -> None:
    header = _parse({}, 0)
    assert header.tensors == {}
    assert header.metadata == {}


def test_subbyte_dtypes() -> None:
    header = _parse({"f4": _entry("F4", [2, 3], 0, 3), "f6": _entry("F6_E2M3", [4], 3, 6)}, 6)
    assert header.tensors["f4"].nbytes == 3
    assert header.tensors["f6"].numel == 4


def test_dtype_table_matches_safetensors(tmp_path: Path) -> None:
    """Every dtype we accept is one safetensors 0.8 accepts, with the same element size."""
    for i, (dtype, bits) in enumerate(sorted(DTYPE_BITS.items())):
        n = 8  # elements; 8 * bits / 8 bytes is whole for every dtype
        path = write_safetensors_raw(
            tmp_path / f"{i}.safetensors", {"t": _entry(dtype, [n], 0, n * bits // 8)}, n * bits // 8
        )
        with safe_open(str(path), "numpy") as st:
            assert list(st.keys()) == ["t"]
        assert read_header(path).tensors["t"].dtype == dtype


# --- malformed headers -----------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "__metadata__": {"format": "pt"},
    "alpha": _entry("F32", [2, 2], 0, 16),
    "beta": _entry("F16", [4], 16, 24),
    "gamma": _entry("U8", [8], 24, 32),
}
GOOD_DATA = 32


def _mut(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(json.dumps(GOOD))
    fn(header)
    return header


def _set(key: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(h: dict[str, Any]) -> None:
        h[key][field] = value

    return apply


def _raw(text: str) -> bytes:
    return text.encode()


# (id, header dict or raw bytes, data bytes or None for GOOD_DATA, expected message part, tensor named,
#  does safetensors itself reject it?)
MALFORMED: list[tuple[str, dict[str, Any] | bytes, int | None, str, str | None, bool]] = [
    ("overlap", _mut(_set("beta", "data_offsets", [12, 20])), None, "overlaps", "beta", True),
    ("gap", _mut(_set("beta", "data_offsets", [18, 26])), None, "gap", "beta", True),
    ("wrong-size", _mut(_set("beta", "shape", [5])), None, "size mismatch", "beta", True),
    ("negative-dim", _mut(_set("alpha", "shape", [-2, -2])), None, "integer >= 0", "alpha", True),
    ("float-dim", _mut(_set("alpha", "shape", [2.0, 2])), None, "integer >= 0", "alpha", True),
    ("bool-dim", _mut(_set("gamma", "shape", [True, 8])), None, "integer >= 0", "gamma", True),
    ("huge-dims", _mut(_set("alpha", "shape", [2**32, 2**32, 2**32])), None, "overflows", "alpha", True),
    (
        "huge-dims-then-zero",
        _mut(_set("alpha", "shape", [2**40, 2**40, 0])),
        None,
        "overflows",
        "alpha",
        True,
    ),
    ("bad-dtype", _mut(_set("beta", "dtype", "F12")), None, "unknown dtype 'F12'", "beta", True),
    ("dtype-not-string", _mut(_set("beta", "dtype", ["F16"])), None, "unknown dtype", "beta", True),
    ("shape-not-list", _mut(_set("beta", "shape", 4)), None, "not a list", "beta", True),
    ("offsets-three", _mut(_set("beta", "data_offsets", [16, 20, 24])), None, "[begin, end]", "beta", True),
    ("offsets-reversed", _mut(_set("gamma", "data_offsets", [32, 24])), None, "begin <= end", "gamma", True),
    ("offsets-negative", _mut(_set("alpha", "data_offsets", [-16, 0])), None, "begin <= end", "alpha", True),
    ("missing-field", _mut(lambda h: h["beta"].pop("shape")), None, "missing shape", "beta", True),
    ("extra-field", _mut(_set("beta", "extra", 1)), None, "unexpected 'extra'", "beta", False),
    ("entry-not-object", _mut(lambda h: h.__setitem__("beta", [1, 2])), None, "not an object", "beta", True),
    ("subbyte-odd", {"f4": _entry("F4", [3], 0, 2)}, 2, "whole number of bytes", "f4", True),
    ("metadata-int", _mut(lambda h: h["__metadata__"].__setitem__("n", 1)), None, "not a string", None, True),
    (
        "metadata-array",
        _mut(lambda h: h.__setitem__("__metadata__", ["a"])),
        None,
        "__metadata__",
        None,
        True,
    ),
    ("trailing-bytes", GOOD, GOOD_DATA + 3, "3 trailing bytes", None, True),
    ("truncated", GOOD, GOOD_DATA - 1, "truncated", None, True),
    ("json-array", _raw("[1, 2, 3]"), 0, "not an object", None, True),
    ("json-string", _raw('"hello"'), 0, "not an object", None, True),
    ("not-json", _raw("{'alpha': 1}"), 0, "not valid JSON", None, True),
    (
        "nan",
        _raw('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
        0,
        "not valid JSON",
        None,
        True,
    ),
    (
        "trailing-nul",
        _raw('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}\0'),
        1,
        "JSON",
        None,
        True,
    ),
    ("deep-nesting", _raw("[" * 200_000 + "]" * 200_000), 0, "not valid JSON", None, True),
    (
        "duplicate-tensor",
        _raw(
            '{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},'
            ' "a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}'
        ),
        4,
        "duplicate key 'a'",
        None,
        False,
    ),
    (
        "duplicate-field",
        _raw('{"a": {"dtype": "U8", "dtype": "F32", "shape": [2], "data_offsets": [0, 2]}}'),
        2,
        "duplicate key 'dtype'",
        None,
        True,
    ),
    (
        "duplicate-metadata-key",
        _raw('{"__metadata__": {"k": "1", "k": "2"}}'),
        0,
        "duplicate key 'k'",
        None,
        False,
    ),
    (
        "duplicate-metadata",
        _raw('{"__metadata__": {"k": "1"}, "__metadata__": {"k": "2"}}'),
        0,
        "duplicate key '__metadata__'",
        None,
        True,
    ),
    (
        "lone-surrogate",
        _raw('{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'),
        1,
        "surrogate",
        None,
        True,
    ),
    (
        "non-utf8",
        b'{"caf\xe9": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        1,
        "UTF-8",
        None,
        True,
    ),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_rejects_malformed(
    tmp_path: Path, case: tuple[str, dict[str, Any] | bytes, int | None, str, str | None, bool]
) -> None:
    _, header, data_size, expected, tensor, st_rejects = case
    path = write_safetensors_raw(
        tmp_path / "bad.safetensors", header, GOOD_DATA if data_size is None else data_size
    )
    with pytest.raises(InvalidModelFile) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    if tensor is not None:
        assert f"tensor {tensor!r}" in message
        assert info.value.details["tensor"] == tensor
    # Where safetensors is laxer than we are, the row says so; otherwise it rejects too.
    if st_rejects:
        with pytest.raises(Exception, match=r"(?i)error|invalid|header"):
            safe_open(str(path), "numpy")


def _length_prefixed(path: Path, length: int, rest: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", length) + rest)
    return path


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = _length_prefixed(tmp_path / "a.safetensors", 1000, b"{}")
    with pytest.raises(InvalidModelFile, match="exceeds the file size"):
        read_header(path)


def test_header_length_huge(tmp_path: Path) -> None:
    path = _length_prefixed(tmp_path / "a.safetensors", 2**64 - 1, b"{}")
    with pytest.raises(InvalidModelFile, match="exceeds the limit"):
        read_header(path)


def test_header_length_over_cap(tmp_path: Path) -> None:
    path = write_safetensors_raw(tmp_path / "a.safetensors", GOOD, GOOD_DATA)
    read_header(path)
    with pytest.raises(InvalidModelFile, match="exceeds the limit of 64 bytes"):
        read_header(path, max_header_bytes=64)


def test_header_length_zero(tmp_path: Path) -> None:
    path = _length_prefixed(tmp_path / "a.safetensors", 0, b"")
    with pytest.raises(InvalidModelFile, match="header length is 0"):
        read_header(path)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_too_small(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\1" * size)
    with pytest.raises(InvalidModelFile, match="too small"):
        read_header(path)


def test_pickle_named_safetensors_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(InvalidModelFile, match=str(path)):
        read_header(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFound, match="no such file"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidModelFile, match="not a regular file"):
        read_header(tmp_path)


def test_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pread of the length, one of the header; the (here sparse, 1 GiB) data section is never read."""
    data_size = 2**30
    path = write_safetensors_raw(
        tmp_path / "big.safetensors", {"w": _entry("U8", [data_size], 0, data_size)}, 0
    )
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + data_size)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def spy(fd: int, n: int, offset: int) -> bytes:
        reads.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    header = read_header(path)
    assert header.data_size == data_size
    assert reads == [(8, 0), (header.header_size, 8)]


# --- scale -----------------------------------------------------------------------------------


def _big_header(n: int) -> tuple[bytes, int]:
    # Written as text: building 200k dicts first would cost the test more than the parse does.
    entries = ",".join(
        f'"model.layers.{i}.mlp.weight":{{"dtype":"F16","shape":[2,3],"data_offsets":[{12 * i},{12 * i + 12}]}}'
        for i in range(n)
    )
    return ('{"__metadata__":{"format":"pt"},' + entries + "}").encode(), 12 * n


def test_200k_tensors_fast() -> None:
    raw, data_size = _big_header(200_000)
    wall = time.perf_counter()
    cpu = time.process_time()
    header = parse_header(raw, file_size=8 + len(raw) + data_size, path=Path("big.safetensors"))
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    print(f"\n200,000 tensors, {len(raw) / 1e6:.1f} MB header: {cpu:.2f} s CPU, {wall:.2f} s wall")
    assert len(header.tensors) == 200_000
    assert header.parameters() == 6 * 200_000
    assert cpu < 3.0


def test_memory_bounded_by_header_size() -> None:
    """Peak allocation while parsing stays a small multiple of the header's own size."""
    raw, data_size = _big_header(10_000)
    tracemalloc.start()
    try:
        header = parse_header(raw, file_size=8 + len(raw) + data_size, path=Path("big.safetensors"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n10,000 tensors, {len(raw) / 1e6:.1f} MB header: peak {peak / 1e6:.1f} MB")
    assert len(header.tensors) == 10_000
    assert peak < 16 * len(raw)


def test_tensor_info_is_a_plain_frozen_dataclass() -> None:
    info = TensorInfo("w", "F16", (2, 3), 0, 12)
    assert (info.numel, info.nbytes) == (6, 12)
    parsed = _parse({"w": _entry("F16", [2, 3], 0, 12)}, 12).tensors["w"]
    assert parsed == info
    assert hash(parsed) == hash(info)


# --- the structure memo ------------------------------------------------------------------------


def _metadata_first(metadata: Any, tensors: dict[str, Any], pad: int = 0) -> bytes:
    """A header as safetensors writes it: ``__metadata__`` first, compact, then ``pad`` spaces."""
    raw = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
    return raw + b" " * pad


def _verdict(raw: bytes, data_size: int, memo: StructureMemo | None) -> SafetensorsHeader | str:
    try:
        return parse_header(raw, file_size=8 + len(raw) + data_size, path=Path("m.safetensors"), memo=memo)
    except InvalidModelFile as exc:
        return str(exc)


TENSORS = {k: v for k, v in GOOD.items() if k != "__metadata__"}


def test_memo_reuses_a_known_tensor_section_with_each_file_s_own_metadata() -> None:
    memo = StructureMemo()
    first = _verdict(_metadata_first({"format": "pt", "a": "1"}, TENSORS), GOOD_DATA, memo)
    second = _verdict(_metadata_first({"b": "2"}, TENSORS, pad=5), GOOD_DATA, memo)  # padding differs
    assert isinstance(first, SafetensorsHeader) and isinstance(second, SafetensorsHeader)
    assert (memo.hits, memo.misses, len(memo)) == (1, 1, 1)
    assert second.tensors is first.tensors
    assert second.metadata == {"b": "2"}
    assert second.structure == first.structure is not None
    assert second.header_size == first.header_size + len('"b":"2"') - len('"format":"pt","a":"1"') + 5


BAD_METADATA: list[Any] = [
    {"n": 1},
    ["a"],
    7,
    {"k": "\ud800"},
]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=["int-value", "array", "number", "lone-surrogate"])
def test_memo_hit_checks_the_metadata_as_the_strict_parser_does(metadata: Any) -> None:
    memo = StructureMemo()
    assert isinstance(
        _verdict(_metadata_first({"format": "pt"}, TENSORS), GOOD_DATA, memo), SafetensorsHeader
    )
    raw = _metadata_first(metadata, TENSORS)
    with_memo = _verdict(raw, GOOD_DATA, memo)
    assert memo.hits == 1
    assert isinstance(with_memo, str)
    assert with_memo == _verdict(raw, GOOD_DATA, None)


def test_memo_hit_rejects_duplicate_metadata_keys() -> None:
    memo = StructureMemo()
    _verdict(_metadata_first({}, TENSORS), GOOD_DATA, memo)
    raw = (
        b'{"__metadata__":{"k":"1","k":"2"},'
        + _metadata_first(None, TENSORS)[len(b'{"__metadata__":null,') :]
    )
    assert "duplicate key 'k'" in str(_verdict(raw, GOOD_DATA, memo))
    assert memo.hits == 1


def test_memo_keys_on_the_data_size_and_remembers_only_valid_sections() -> None:
    memo = StructureMemo()
    truncated = _verdict(_metadata_first({}, TENSORS), GOOD_DATA - 1, memo)
    assert isinstance(truncated, str) and "truncated" in truncated
    assert len(memo) == 0
    assert isinstance(_verdict(_metadata_first({}, TENSORS), GOOD_DATA, memo), SafetensorsHeader)
    trailing = _verdict(_metadata_first({}, TENSORS), GOOD_DATA + 3, memo)
    assert isinstance(trailing, str) and "trailing bytes" in trailing
    assert memo.hits == 0


def test_memo_applies_only_when_metadata_comes_first() -> None:
    memo = StructureMemo()
    raw = json.dumps({**TENSORS, "__metadata__": {"a": "1"}}).encode()
    for _ in range(2):
        header = _verdict(raw, GOOD_DATA, memo)
        assert isinstance(header, SafetensorsHeader) and header.structure is None
    assert (memo.hits, len(memo)) == (0, 0)


def test_memo_is_bounded() -> None:
    memo = StructureMemo(max_bytes=300)
    for i in range(10):
        tensors = {f"t{i}.{k}": v for k, v in TENSORS.items()}
        assert isinstance(_verdict(_metadata_first({}, tensors), GOOD_DATA, memo), SafetensorsHeader)
    assert 0 < len(memo) < 10 and memo.bytes <= 300
