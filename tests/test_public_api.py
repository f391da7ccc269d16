import ast
import builtins
from pathlib import Path

import modelkeeper
import modelkeeper.cache
import modelkeeper.discovery
import modelkeeper.protocol
import modelkeeper.registry
import modelkeeper.worker


def test_top_level_exports() -> None:
    assert set(modelkeeper.__all__) == {
        "PROTOCOL_VERSION", "CommandType", "ErrorCode", "ProtocolError", "WorkerConnection", "__version__",
    }  # fmt: skip


def test_every_exported_name_exists_and_is_public() -> None:
    modules = (
        modelkeeper, modelkeeper.protocol, modelkeeper.worker, modelkeeper.cache, modelkeeper.discovery,
        modelkeeper.registry,
    )  # fmt: skip
    for module in modules:
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
        public = {n for n in dir(module) if not n.startswith("_") and n[0].isupper()}
        assert public <= set(module.__all__) | {"TYPE_CHECKING"}, module.__name__


SRC = Path(modelkeeper.__file__).parent
_KNOWN_DUPLICATES: set[str] = set()


def _exception_classes() -> dict[str, list[str]]:
    """Every exception class defined at the top of a module of ``src/modelkeeper``: name -> files."""
    classes: list[tuple[str, str, set[str]]] = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                classes.append((node.name, str(path.relative_to(SRC)), bases))
    exceptions = {
        n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    grown = True
    while grown:
        before = len(exceptions)
        exceptions |= {name for name, _, bases in classes if bases & exceptions}
        grown = len(exceptions) > before
    found: dict[str, list[str]] = {}
    for name, file, bases in classes:
        if bases & exceptions:
            found.setdefault(name, []).append(file)
    return found


def test_exception_names_are_unique() -> None:
    """``except ModelNotFound`` must mean one class: no two exception classes share a name."""
    found = _exception_classes()
    assert {"ProtocolError", "WorkerError", "ModelNotFound", "HashingCancelled"} <= found.keys()
    duplicates = {name: files for name, files in found.items() if len(files) > 1}
    assert duplicates.keys() <= _KNOWN_DUPLICATES, duplicates
