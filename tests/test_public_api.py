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
