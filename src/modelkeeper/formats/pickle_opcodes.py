"""Gate 2 of the pickle sandbox: the static opcode scan of one pickle stream, which executes nothing.

Every pickle is walked with ``pickletools.genops``; only the opcodes of ``ALLOWED_OPCODES`` pass,
and every ``GLOBAL`` must be one of ``ALLOWED_GLOBALS``. ``STACK_GLOBAL``/``INST`` operands are
resolved only to name them in the error. Any scan error rejects the file (``UnsafePickle``, or
``InvalidModelFile`` for a first pickle that is no pickle at all). ``pickle_layout`` calls it on
each pickle a checkpoint holds.
"""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import IO, Any, Final

from modelkeeper.formats.errors import InvalidModelFile, UnsafePickle
from modelkeeper.formats.pickle_allowlist import ALLOWED_GLOBALS, ALLOWED_OPCODES, MAX_PICKLE_BYTES

__all__ = ["LimitedReader", "scan_stream"]

_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)


class LimitedReader:
    """A read-only view of a file that refuses to hand out more than ``limit`` bytes."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._left = limit
        self.position = 0

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        self.position += len(data)
        return data

    def read(self, n: int) -> bytes:
        if n > self._left:
            raise _ScanLimitError
        return self._take(self._f.read(n))

    def tell(self) -> int:
        return self.position

    def readline(self) -> bytes:
        line = self._f.readline(self._left + 1)
        if len(line) > self._left:
            raise _ScanLimitError
        return self._take(line)


class _ScanLimitError(Exception):
    pass


_UNKNOWN: Final = object()
# How an opcode moves the scanner's view of the stack (everything else pushes an unknown value).
_PUSH, _PUSH_STRING, _PUT, _MEMOIZE, _GET, _GLOBAL, _STOP, _NEUTRAL = (object() for _ in range(8))
_OP_KINDS: Final[dict[str, object]] = {
    **dict.fromkeys(_STRING_OPS, _PUSH_STRING),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), _PUT),
    "MEMOIZE": _MEMOIZE,
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
    **dict.fromkeys(("GLOBAL", "INST", "STACK_GLOBAL"), _GLOBAL),
    "STOP": _STOP,
    "FRAME": _NEUTRAL,
    "PROTO": _NEUTRAL,
}


def scan_stream(
    path: Path,
    where: str,
    stream: Any,
    *,
    first: bool,
    collect: list[list[tuple[str, Any]]] | None = None,
) -> tuple[int, set[tuple[str, str]]]:
    """Walk one pickle up to its STOP; return its end offset and the globals it references.

    Raises ``UnsafePickle`` at the first global off the allowlist, and after the walk for an
    opcode off the allowlist (so that a protocol-4 payload is still named by its global).
    ``collect`` receives the (opcode, argument) list of the pickle, for small ones.
    """
    found: set[tuple[str, str]] = set()
    ops: list[tuple[str, Any]] = []
    bad_opcode: tuple[str, int] | None = None
    # Just enough of the stack to resolve STACK_GLOBAL operands for the error message: the last
    # two values pushed (``second``, ``last``) when they are string literals, and the memo
    # slots holding strings. Every other opcode pushes an unknown value as far as this cares.
    second: Any = _UNKNOWN
    last: Any = _UNKNOWN
    memo: dict[int, Any] = {}
    end = -1
    first_op = ""
    allowed = ALLOWED_OPCODES
    kinds = _OP_KINDS
    try:
        for opcode, arg, at in pickletools.genops(stream):
            name = opcode.name
            if name not in allowed and bad_opcode is None:
                bad_opcode = (name, -1 if at is None else at)
            if collect is not None:
                ops.append((name, arg))
            kind = kinds.get(name, _PUSH)
            if kind is _PUSH:
                second, last = last, _UNKNOWN
            elif kind is _PUSH_STRING:
                second, last = last, (arg if isinstance(arg, str) else _UNKNOWN)
            elif kind is _PUT:
                memo[int(arg or 0)] = last
            elif kind is _MEMOIZE:
                memo[len(memo)] = last
            elif kind is _GET:
                second, last = last, memo.get(int(arg or 0), _UNKNOWN)
            elif kind is _GLOBAL:
                pair = _split_global(arg) if name != "STACK_GLOBAL" else _pair(second, last)
                _check_global(path, where, name, pair, at)
                found.add(pair)  # type: ignore[arg-type]  # _check_global refused None
                second, last = last, _UNKNOWN
            elif kind is _STOP:
                end = (at or 0) + 1
            first_op = first_op or name
    except _ScanLimitError:
        raise UnsafePickle(
            f"{path}: {where} pickle is larger than the {MAX_PICKLE_BYTES}-byte scan limit", path=str(path)
        ) from None
    except (ValueError, EOFError, OverflowError) as exc:
        if first and first_op != "PROTO":
            # torch writes PROTO first; garbage that merely decodes as a few opcodes is not a pickle.
            raise InvalidModelFile(
                f"{path}: neither a torch zip archive nor a pickle", path=str(path)
            ) from None
        raise UnsafePickle(f"{path}: {where} pickle cannot be scanned: {exc}", path=str(path)) from None
    if bad_opcode is not None:
        raise UnsafePickle(
            f"{path}: {where} pickle uses opcode {bad_opcode[0]} at offset {bad_opcode[1]}, "
            "which the restricted loader does not allow",
            path=str(path),
            opcode=bad_opcode[0],
        )
    if collect is not None:
        collect.append(ops)
    return end, found


def _pair(module: Any, name: Any) -> tuple[str, str] | None:
    return (module, name) if isinstance(module, str) and isinstance(name, str) else None


def _split_global(arg: Any) -> tuple[str, str] | None:
    # genops joins module and name with a space; only an unambiguous split can be allowlisted.
    if not isinstance(arg, str) or arg.count(" ") != 1:
        return None
    module, name = arg.split(" ")
    return module, name


def _check_global(path: Path, where: str, opcode: str, pair: tuple[str, str] | None, pos: int | None) -> None:
    if pair is not None and pair in ALLOWED_GLOBALS and opcode == "GLOBAL":
        return
    if pair is None:
        named = "?"
        problem = f"{opcode} with operands that cannot be resolved statically"
    elif pair in ALLOWED_GLOBALS:
        named = f"{pair[0]}.{pair[1]}"
        problem = f"{named} through {opcode}, which the restricted loader does not allow"
    else:
        named = f"{pair[0]}.{pair[1]}"
        problem = f"{opcode} {named}, which is not on the allowlist"
    raise UnsafePickle(
        f"{path}: {where} pickle references {problem} (offset {pos})", path=str(path), global_name=named
    )
