"""The pickle sandbox: hostile files are refused before any load, real checkpoints load in a child.

Static refusals run in process (``no_child`` proves no child was started); only files that pass
the scan spend a child (~3 s each for the torch import), so the loading tests are few and each
checks several things.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelkeeper.formats import _pickle_child as child
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsafePickle, UnsupportedFormat
from modelkeeper.formats.pickle_runner import _parse_result, to_inspection, verify_converted
from modelkeeper.formats.pickle_sandbox import (
    ALLOWED_GLOBALS,
    ALLOWED_OPCODES,
    TEST_SLEEP_ENV,
    TORCH_TO_SAFETENSORS_DTYPE,
    PickleInspection,
    PickleScan,
    convert_pickle_to_safetensors,
    inspect_pickle,
    scan_pickle,
)
from modelkeeper.formats.safetensors_header import read_header
from tests.formats import hostile
from tests.formats.hostile import call, glob, text, whole

# --- the allowlists themselves -----------------------------------------------------------------


def test_allowlist_is_a_subset_of_torch_weights_only() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    torch_allowed = _get_allowed_globals()
    for module, name in ALLOWED_GLOBALS:
        assert f"{module}.{name}" in torch_allowed, (module, name)


def test_allowlist_names_are_not_remapped_by_torch() -> None:
    """torch rewrites some Python 2 names before lookup; none of ours may be such a name."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    for module, name in ALLOWED_GLOBALS:
        assert (module, name) not in NAME_MAPPING
        assert module not in IMPORT_MAPPING


def test_opcodes_are_those_torch_implements() -> None:
    import torch._weights_only_unpickler as wo

    for opcode in ALLOWED_OPCODES:
        assert getattr(wo, opcode) == getattr(pickle, opcode), opcode
    assert "STACK_GLOBAL" not in ALLOWED_OPCODES
    assert "INST" not in ALLOWED_OPCODES


def test_dtype_table_round_trips_through_torch() -> None:
    for torch_name in TORCH_TO_SAFETENSORS_DTYPE:
        assert str(getattr(torch, torch_name.removeprefix("torch."))) == torch_name


# --- what real torch.save writes passes the static scan ------------------------------------------


def _lightning_checkpoint() -> dict[str, Any]:
    shared = torch.arange(12, dtype=torch.float32)
    return {
        "epoch": 2,
        "global_step": 1200,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": OrderedDict(
            [
                ("model.diffusion_model.in.weight", torch.randn(4, 3, dtype=torch.float16)),
                ("model.diffusion_model.in.bias", torch.randn(4, dtype=torch.float32)),
                ("model.diffusion_model.norm.weight", torch.randn(4, dtype=torch.bfloat16)),
                ("model.param", torch.nn.Parameter(torch.randn(2, 2))),
                ("model.tied", shared),
                ("model.tied_view", shared[2:8].view(2, 3)),
                ("model.scalar", torch.tensor(0.5)),
                ("model.empty", torch.zeros(0, 4, dtype=torch.float16)),
                ("model.fp8", torch.randn(3, 2).to(torch.float8_e4m3fn)),
                ("model.u16", torch.arange(5, dtype=torch.int32).to(torch.uint16)),
                ("model.steps", torch.tensor(7, dtype=torch.int64)),
            ]
        ),
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 2)}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]}],
            }
        ],
        "lr_schedulers": [],
        "callbacks": {"ModelCheckpoint": {"best_model_score": None, "monitor": "val/loss"}},
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-4, "size": torch.Size([64, 64]), "dtype": torch.float16, "flag": True},
    }


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_real_checkpoints_pass_the_scan(tmp_path: Path, zipped: bool, no_child: None) -> None:
    path = tmp_path / "ckpt.ckpt"
    torch.save(_lightning_checkpoint(), path, _use_new_zipfile_serialization=zipped)
    scan = scan_pickle(path)
    assert scan.format == ("torch_zip" if zipped else "legacy")
    assert scan.globals <= ALLOWED_GLOBALS
    assert ("torch._utils", "_rebuild_tensor_v2") in scan.globals
    if zipped:
        assert "data.pkl" in scan.records
        assert {"byteorder", "version", ".format_version"} <= set(scan.records)


def test_no_child_guard_stops_the_spawn_the_sandbox_uses(tmp_path: Path, no_child: None) -> None:
    """The ``no_child`` fixture patches the very function that starts the child: a file that passes
    the scan reaches it, so a refusal under ``no_child`` proves the static gates refused."""
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(AssertionError, match="sandbox child was started"):
        inspect_pickle(path)


def test_every_dtype_passes_the_scan(tmp_path: Path, no_child: None) -> None:
    tensors = {
        name: torch.zeros(2, dtype=getattr(torch, name.removeprefix("torch.")))
        for name in TORCH_TO_SAFETENSORS_DTYPE
    }
    for zipped in (True, False):
        path = tmp_path / f"all-{zipped}.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=zipped)
        assert scan_pickle(path).globals <= ALLOWED_GLOBALS


# --- hostile corpus: refused by the static gates, no child, no marker -----------------------------


def _payload_ids() -> list[str]:
    return sorted(hostile.payloads(Path("/nonexistent/markers")).keys())


@pytest.mark.parametrize("payload", _payload_ids())
@pytest.mark.parametrize("placement", ["bare", "legacy-state-dict", "zip-data-pkl"])
def test_payloads_refused(
    tmp_path: Path, marker_dir: Path, no_child: None, payload: str, placement: str
) -> None:
    expr, named = hostile.payloads(marker_dir)[payload]
    path = tmp_path / "model.ckpt"
    if placement == "bare":
        path.write_bytes(whole(expr))
    elif placement == "legacy-state-dict":
        path.write_bytes(hostile.legacy_file(hostile.state_dict_with(expr)))
    else:
        src = hostile.clean_zip(tmp_path / "archive.pt")
        hostile.rewrite_zip(src, path, replace={"archive/data.pkl": hostile.state_dict_with(expr)})
    with pytest.raises(UnsafePickle) as info:
        inspect_pickle(path)
    message = str(info.value)
    assert str(path) in message
    assert named in message
    assert "not on the allowlist" in message
    assert info.value.details["global_name"] == named


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_reduce_class_payload_every_protocol(
    tmp_path: Path, marker_dir: Path, no_child: None, protocol: int
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(hostile.reduce_payload_pickle(marker_dir, protocol))
    opcodes = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert ("STACK_GLOBAL" in opcodes) == (protocol >= 4)
    with pytest.raises(UnsafePickle, match=r"posix\.system.*not on the allowlist"):
        inspect_pickle(path)


def test_payload_hidden_in_real_torch_save(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    """torch.save itself pickles the payload inside a nested state dict of real tensors."""
    for zipped in (True, False):
        path = tmp_path / f"real-{zipped}.pt"
        evil = hostile.ReducePayload(f"touch {marker_dir / 'real'}")
        obj = {"state_dict": {"w": torch.ones(3), "opts": {"ema": evil}}, "epoch": 1}
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(UnsafePickle, match=r"posix\.system"):
            inspect_pickle(path)


def test_torch_only_globals_refused(tmp_path: Path, no_child: None) -> None:
    """Globals torch's weights_only would accept but the state-dict allowlist does not."""
    for module, name in hostile.TORCH_ONLY_GLOBALS:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(hostile.legacy_file(hostile.state_dict_with(glob(module, name))))
        with pytest.raises(UnsafePickle, match=rf"{module}\.{name}"):
            scan_pickle(path)


def test_payload_in_each_legacy_pickle(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    evil = whole(call(glob("os", "system"), text(f"touch {marker_dir / 'legacy'}")))
    clean = whole(hostile.dct((text("a"), hostile.integer(1))))
    variants = {
        "sys_info": hostile.legacy_file(clean, sys_info=evil),
        "keys": hostile.legacy_file(clean, keys=evil),
        "main": hostile.legacy_file(evil),
    }
    for where, blob in variants.items():
        path = tmp_path / f"{where}.pt"
        path.write_bytes(blob)
        with pytest.raises(UnsafePickle, match=r"os\.system"):
            inspect_pickle(path)


def _opcode_case(name: str, marker_dir: Path) -> tuple[bytes, type[Exception], str]:
    touch = text(f"touch {marker_dir / name}")
    cases: dict[str, tuple[bytes, type[Exception], str]] = {
        # INST names its class inline (protocol 0).
        "inst": (b"(" + b"S'touch x'\n" + b"ios\nsystem\n.", UnsafePickle, "INST os.system"),
        # OBJ takes the class from the stack, which a GLOBAL put there.
        "obj": (
            hostile.proto() + hostile.MARK + glob("os", "system") + touch + b"o.",
            UnsafePickle,
            "os.system",
        ),
        # STACK_GLOBAL operands hidden behind the memo.
        "stack-global-memo": (
            hostile.proto(4)
            + b"\x8c\x02os"
            + b"\x94"
            + b"\x8c\x06system"
            + b"\x94"
            + hostile.POP
            + hostile.POP
            + b"h\x00h\x01\x93"
            + hostile.tup(touch)
            + b"R.",
            UnsafePickle,
            "STACK_GLOBAL os.system",
        ),
        "stack-global-computed": (
            hostile.proto(4) + hostile.NONE + hostile.NONE + b"\x93" + hostile.EMPTY_TUPLE + b"R.",
            UnsafePickle,
            "cannot be resolved statically",
        ),
        # The extension registry maps small ints to globals: not allowed at all.
        "ext1": (hostile.proto() + b"\x82\x01" + hostile.EMPTY_TUPLE + b"R.", UnsafePickle, "opcode EXT1"),
        # An allowlisted name with extra text, which a naive split would accept.
        "global-with-space": (
            whole(glob("collections", "OrderedDict x") + hostile.EMPTY_TUPLE + b"R"),
            UnsafePickle,
            "cannot be resolved statically",
        ),
        # Opcodes torch's restricted loader lacks, with only safe content.
        "frame": (pickle.dumps({"a": 1}, protocol=4), UnsafePickle, "opcode FRAME"),
        "binbytes": (pickle.dumps(b"abc", protocol=3), UnsafePickle, "opcode SHORT_BINBYTES"),
        # A string claiming 4 GiB: refused without allocating it.
        "huge-string": (
            hostile.proto() + b"X" + struct.pack("<I", 2**32 - 1) + b"abc",
            UnsafePickle,
            "limit",
        ),
        "truncated": (
            whole(hostile.dct((text("a"), hostile.integer(1))))[:-4],
            UnsafePickle,
            "cannot be scanned",
        ),
        "no-stop": (hostile.proto() + hostile.NONE, UnsafePickle, "cannot be scanned"),
        "bad-magic": (
            hostile.legacy_file(whole(hostile.EMPTY_DICT), magic=12345),
            InvalidModelFile,
            "no legacy magic",
        ),
        "plain-dict-pickle": (whole(hostile.EMPTY_DICT), InvalidModelFile, "no legacy magic"),
        "keys-not-strings": (
            hostile.legacy_file(whole(hostile.EMPTY_DICT), keys=whole(hostile.lst(hostile.integer(1)))),
            InvalidModelFile,
            "storage keys",
        ),
        "missing-storages": (
            hostile.legacy_file(whole(hostile.EMPTY_DICT), keys=pickle.dumps(["1", "2"], protocol=2)),
            InvalidModelFile,
            "truncated",
        ),
    }
    return cases[name]


OPCODE_CASES = [
    "inst",
    "obj",
    "stack-global-memo",
    "stack-global-computed",
    "ext1",
    "global-with-space",
    "frame",
    "binbytes",
    "huge-string",
    "truncated",
    "no-stop",
    "bad-magic",
    "plain-dict-pickle",
    "keys-not-strings",
    "missing-storages",
]


@pytest.mark.parametrize("case", OPCODE_CASES)
def test_opcode_tricks(tmp_path: Path, marker_dir: Path, no_child: None, case: str) -> None:
    blob, error, expected = _opcode_case(case, marker_dir)
    path = tmp_path / f"{case}.pth"
    path.write_bytes(blob)
    with pytest.raises(error) as info:
        inspect_pickle(path)
    assert type(info.value) is error
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_zip_tricks(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    tricks = hostile.zip_tricks(tmp_path, marker_dir)
    for name, (path, expected) in tricks.items():
        with pytest.raises(UnsafePickle) as info:
            inspect_pickle(path)
        assert str(path) in str(info.value), name
        assert expected in str(info.value), (name, str(info.value))


@pytest.mark.parametrize("kind", ["truncated-zip", "no-data-pkl", "empty", "binary", "text", "prepended-zip"])
def test_structural_garbage(tmp_path: Path, no_child: None, kind: str) -> None:
    src = hostile.clean_zip(tmp_path / "archive.pt")
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated-zip":
        path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif kind == "no-data-pkl":
        hostile.rewrite_zip(src, path, drop={"archive/data.pkl"})
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        hostile.copy_python_binary_header(path)
    elif kind == "text":
        path.write_text("Hello, this is not a checkpoint.\n")
    else:
        path.write_bytes(b"JUNK" + src.read_bytes())
    with pytest.raises(InvalidModelFile) as info:
        inspect_pickle(path)
    assert str(path) in str(info.value)


def test_tar_checkpoint_refused(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    path = hostile.tar_checkpoint(tmp_path / "old.tar.pt", marker_dir)
    with pytest.raises(UnsafePickle, match="legacy tar"):
        inspect_pickle(path)


def test_pickle_named_safetensors_refused_by_both(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(hostile.reduce_payload_pickle(marker_dir, 2))
    with pytest.raises(InvalidModelFile, match=r"safetensors|header"):
        read_header(path)
    with pytest.raises(UnsafePickle, match=r"posix\.system"):
        inspect_pickle(path)


def test_convert_refuses_hostile_and_writes_nothing(tmp_path: Path, marker_dir: Path, no_child: None) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(hostile.reduce_payload_pickle(marker_dir, 2))
    dest = tmp_path / "out" / "model.safetensors"
    dest.parent.mkdir()
    with pytest.raises(UnsafePickle):
        convert_pickle_to_safetensors(path, dest)
    assert list(dest.parent.iterdir()) == []


def test_missing_file(tmp_path: Path, no_child: None) -> None:
    with pytest.raises(ModelFileNotFound, match="no such file"):
        inspect_pickle(tmp_path / "missing.ckpt")
    with pytest.raises(InvalidModelFile, match="directory"):
        inspect_pickle(tmp_path)


# --- the parent trusts nothing the child says -----------------------------------------------------


def _scan(path: Path = Path("/m.ckpt")) -> PickleScan:
    return PickleScan(path=path, format="torch_zip", globals=frozenset())


@pytest.mark.parametrize(
    ("stdout", "returncode", "error", "expected"),
    [
        (b"", 1, InvalidModelFile, "without a result"),
        (b"not json", 0, InvalidModelFile, "without a result"),
        (b"[1, 2]", 0, InvalidModelFile, "malformed result"),
        (b'{"ok": "yes"}', 0, InvalidModelFile, "malformed result"),
        (b'{"ok": false, "kind": "unsafe", "message": "no"}', 0, UnsafePickle, "no"),
        (b'{"ok": false, "kind": "unsupported", "message": "x"}', 0, UnsupportedFormat, "x"),
        (b'{"ok": false, "kind": "memory", "message": "x"}', 0, InvalidModelFile, "ran out of memory"),
        (b'{"ok": false, "kind": "weird", "message": "x"}', 0, InvalidModelFile, "x"),
        (b'{"ok": false, "kind": 3, "message": "x"}', 0, InvalidModelFile, "malformed error"),
        (b"", -9, InvalidModelFile, "was killed"),
        (b"", -25, InvalidModelFile, "output size limit"),
        (b"", -11, InvalidModelFile, "crashed"),
        (b"", -99, InvalidModelFile, "died of signal 99"),
    ],
)
def test_child_result_parsing(stdout: bytes, returncode: int, error: type[Exception], expected: str) -> None:
    with pytest.raises(error, match=expected):
        _parse_result(Path("/m.ckpt"), returncode, stdout, b"some stderr")


@pytest.mark.parametrize(
    ("tensors", "error", "expected"),
    [
        ("nope", InvalidModelFile, "malformed result"),
        ([["a", "torch.float16", [-1]]], InvalidModelFile, "malformed tensor"),
        ([["a", "torch.float16", [True]]], InvalidModelFile, "malformed tensor"),
        ([["a", "torch.float16", [2.0]]], InvalidModelFile, "malformed tensor"),
        ([["a", "torch.float16"]], InvalidModelFile, "malformed tensor"),
        ([[1, "torch.float16", [2]]], InvalidModelFile, "malformed tensor"),
        ([["a", "torch.float16", [2]], ["a", "torch.float16", [2]]], InvalidModelFile, "appears twice"),
        ([["\ud800", "torch.float16", [2]]], InvalidModelFile, "malformed tensor"),
        ([["a", "torch.complex128", [2]]], UnsupportedFormat, "cannot store"),
        ([["a", "os.system", [2]]], UnsupportedFormat, "cannot store"),
    ],
)
def test_child_inspection_validated(tensors: Any, error: type[Exception], expected: str) -> None:
    with pytest.raises(error, match=expected):
        to_inspection(_scan(), {"ok": True, "tensors": tensors, "non_tensor_keys": []})


def test_converted_file_must_match_inspection(tmp_path: Path) -> None:
    written = hostile.write_safetensors_raw(
        tmp_path / "x.safetensors", {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, 4
    )
    good = to_inspection(
        _scan(), {"ok": True, "tensors": [["a", "torch.float16", [2]]], "non_tensor_keys": []}
    )
    verify_converted(Path("/m.ckpt"), written, good)
    lying = to_inspection(
        _scan(), {"ok": True, "tensors": [["a", "torch.float32", [2]]], "non_tensor_keys": []}
    )
    with pytest.raises(InvalidModelFile, match="does not match"):
        verify_converted(Path("/m.ckpt"), written, lying)


# --- child helpers, exercised in process on real objects (nothing is unpickled) ------------------


def test_child_refuses_old_torch() -> None:
    for version in ("2.10.0", "2.13.0+cpu", "3.0.0a0"):
        child.check_torch_version(version)
    for version in ("2.9.1", "1.13.1+cu117", "nonsense"):
        with pytest.raises(child.ChildError, match=r"too old|cannot parse") as info:
            child.check_torch_version(version)
        assert info.value.kind == "unsupported"


def test_child_flatten() -> None:
    t = torch.zeros(1)
    tensors, others = child.flatten(
        torch,
        {
            "state_dict": OrderedDict([("a.b", t), ("c", {"d": t})]),
            "opt": [{"state": {0: {"m": t}}, "groups": [{"lr": 1.0}]}],
            "epoch": 1,
            "hp": {"lr": 1.0, "betas": (0.9, 0.99)},
            "steps": [1, 2, 3],
        },
    )
    assert [name for name, _ in tensors] == ["state_dict.a.b", "state_dict.c.d", "opt.0.state.0.m"]
    assert others == ["opt.0.groups", "epoch", "hp", "steps"]
    with pytest.raises(child.ChildError, match=r"same name 'a\.b'"):
        child.flatten(torch, {"a.b": t, "a": {"b": t}})
    with pytest.raises(child.ChildError, match="not a dict"):
        child.flatten(torch, [t])
    with pytest.raises(child.ChildError, match="dict key of type tuple"):
        child.flatten(torch, {(1, 2): t})


# --- loading in the sandbox (each test here starts one child) ------------------------------------


def _flat(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            out[name] = value
        else:
            out.update(_flat(value, name))
    return out


def _assert_bitwise_equal(converted: Path, original: Path) -> None:
    reference = _flat(torch.load(original, weights_only=True))
    loaded = load_file(str(converted))
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        assert torch.equal(
            got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)
        ), name


def _assert_matches(inspection: PickleInspection, original: Path) -> None:
    reference = _flat(torch.load(original, weights_only=True))
    assert set(inspection.tensors) == set(reference)
    for name, tensor in reference.items():
        info = inspection.tensors[name]
        assert info.dtype == TORCH_TO_SAFETENSORS_DTYPE[str(tensor.dtype)], name
        assert info.shape == tuple(tensor.shape), name


def test_convert_zip_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(), source)
    dest = tmp_path / "out" / "last.safetensors"
    dest.parent.mkdir()
    started = time.perf_counter()
    inspection = convert_pickle_to_safetensors(source, dest)
    print(f"\nconvert (zip) in a child: {time.perf_counter() - started:.2f} s")
    assert inspection.format == "torch_zip"
    assert inspection.path == source
    _assert_matches(inspection, source)
    assert inspection.tensors["state_dict.model.diffusion_model.in.weight"].dtype == "F16"
    assert inspection.tensors["state_dict.model.diffusion_model.norm.weight"].dtype == "BF16"
    assert inspection.tensors["state_dict.model.fp8"].dtype == "F8_E4M3"
    assert inspection.tensors["state_dict.model.scalar"].shape == ()
    assert inspection.tensors["optimizer_states.0.state.0.exp_avg"].shape == (2, 2)
    for key in ("epoch", "global_step", "hyper_parameters", "callbacks", "lr_schedulers"):
        assert key in inspection.non_tensor_keys
    assert "optimizer_states.0.param_groups" in inspection.non_tensor_keys
    _assert_bitwise_equal(dest, source)
    assert read_header(dest).metadata == {"format": "pt"}
    assert [p.name for p in dest.parent.iterdir()] == ["last.safetensors"]  # no partial file left


def test_convert_legacy_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "model.pth"
    state = {
        "state_dict": {
            "w16": torch.randn(8, 4, dtype=torch.float16),
            "w32": torch.randn(3, dtype=torch.float32),
            "wbf": torch.randn(2, 2, dtype=torch.bfloat16),
        },
        "step": 5,
        "name": "legacy",
    }
    torch.save(state, source, _use_new_zipfile_serialization=False)
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"old content")  # replaced atomically
    inspection = convert_pickle_to_safetensors(source, dest)
    assert inspection.format == "legacy"
    _assert_matches(inspection, source)
    assert sorted(inspection.non_tensor_keys) == ["name", "step"]
    _assert_bitwise_equal(dest, source)


def test_inspect_zip_state_dict(tmp_path: Path) -> None:
    source = tmp_path / "unet.bin"
    torch.save(
        {f"down.{i}.weight": torch.zeros(i + 1, 2, dtype=torch.float16) for i in range(20)}
        | {"scale": torch.tensor(2.0, dtype=torch.float32)},
        source,
    )
    started = time.perf_counter()
    inspection = inspect_pickle(source, timeout=60, memory_limit_bytes=256 * 1024 * 1024)
    print(f"\ninspect (zip) in a child: {time.perf_counter() - started:.2f} s")
    assert inspection.format == "torch_zip"
    assert inspection.non_tensor_keys == []
    _assert_matches(inspection, source)
    assert list(inspection.tensors)[:2] == ["down.0.weight", "down.1.weight"]


def test_child_refusal_after_static_scan(tmp_path: Path, marker_dir: Path) -> None:
    """Defense in depth: allowlisted opcodes only, but a persistent id that is not a storage.

    The scan passes it; torch's restricted unpickler in the child refuses it.
    """
    src = hostile.clean_zip(tmp_path / "archive.pt")
    bogus = whole(hostile.tup(text("module"), text("os")) + b"Q")  # BINPERSID ('module', 'os')
    path = hostile.rewrite_zip(src, tmp_path / "bogus.pt", replace={"archive/data.pkl": bogus})
    assert scan_pickle(path).globals == frozenset()
    with pytest.raises(UnsafePickle, match="restricted unpickler refused"):
        inspect_pickle(path)


def test_timeout_kills_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "slow.pt"
    torch.save({"w": torch.ones(2)}, source)
    monkeypatch.setenv(TEST_SLEEP_ENV, "120")
    started = time.perf_counter()
    with pytest.raises(InvalidModelFile, match=r"timed out after 1\.5 s") as info:
        inspect_pickle(source, timeout=1.5)
    elapsed = time.perf_counter() - started
    assert elapsed < 20
    assert info.value.details["timeout"] == 1.5


def test_memory_limit(tmp_path: Path) -> None:
    """A legacy file is read into memory: 32 MiB of tensor against an 8 MiB allowance fails."""
    source = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(8 * 1024 * 1024)}, source, _use_new_zipfile_serialization=False)
    with pytest.raises(InvalidModelFile, match="memory") as info:
        inspect_pickle(source, memory_limit_bytes=8 * 1024 * 1024)
    assert str(source) in str(info.value)
