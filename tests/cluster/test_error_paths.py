"""A node's error about a model it received into RAM only names the user's file, not the node's
``/dev/shm/modelkeeper-received-*`` path: the error as the driver gets it back (``nodes.raise_error``
builds the same ``ProtocolError``) through ``loads.naming_the_users_file``, on a cluster state as
the driver holds it. A node's refusal names ``node/device`` and the cluster key
(``loads.error_in_cluster_terms``). No Ray."""

from __future__ import annotations

from modelkeeper.cluster.catalog import ClusterCatalog
from modelkeeper.cluster.loads import error_in_cluster_terms, naming_the_users_file
from modelkeeper.cluster.receive import ram_root
from modelkeeper.cluster.view import ClusterState
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

KEY = "b3" * 32
USERS = "/models/checkpoints/tiny-sd15.safetensors"
RECEIVED = str(ram_root("b", "1234-0") / KEY[:16] / "tiny-sd15.safetensors")


def catalog() -> ClusterCatalog:
    """Node a has the user's file; node b received it into RAM only."""
    state = ClusterState()
    for node, path in (("a", USERS), ("b", RECEIVED)):
        model = {"key": KEY, "model_id": f"m-{node}", "name": "tiny-sd15", "type": "main", "need": 1,
                 "size": 1, "path": path, "ram_bytes": 0}  # fmt: skip
        state.update(node, f"id-{node}", {"devices": [], "models": [model]})
    return ClusterCatalog(state)


def from_node(message: str, **details: object) -> ProtocolError:
    """The error a node's load answered, as the node link raises it on the driver."""
    return ProtocolError(message, ErrorCode.INVALID_MODEL_FILE, **details)


def test_a_node_error_about_a_received_file_names_the_users_file() -> None:
    cat = catalog()
    exc = from_node(f"{RECEIVED} (unet): shapes do not match the UNet2DConditionModel config", path=RECEIVED)
    named = naming_the_users_file(exc, cat, "b", cat.find(KEY))
    assert named.code is ErrorCode.INVALID_MODEL_FILE
    assert named.message == f"a:{USERS} (unet): shapes do not match the UNet2DConditionModel config"
    assert str(named).endswith(named.message) and named.details == {"path": USERS}
    assert "modelkeeper-" not in named.message


def test_errors_about_the_users_own_file_or_no_file_are_left_as_they_are() -> None:
    cat = catalog()
    own = from_node(f"{USERS}: shapes do not match", path=USERS)
    assert naming_the_users_file(own, cat, "a", cat.find(KEY)).message == f"{USERS}: shapes do not match"
    plain = from_node("no room on cpu")
    assert naming_the_users_file(plain, cat, "b", cat.find(KEY)).message == "no room on cpu"


def test_a_node_refusal_names_the_cluster_device_and_key() -> None:
    cat = catalog()
    refused = ProtocolError(
        "tiny-sd15 is being loaded on cpu as float16; this load asks for dtype bfloat16: wait",
        ErrorCode.ALREADY_LOADED, model_id="m-b", device="cpu", loaded={"dtype": "float16"},
    )  # fmt: skip
    named = error_in_cluster_terms(refused, "b", cat.find(KEY))
    assert named.message.startswith("tiny-sd15 is being loaded on b/cpu as float16;")
    assert named.details == {"model_id": KEY, "device": "b/cpu", "loaded": {"dtype": "float16"}}
    assert str(named).endswith(named.message)
    again = error_in_cluster_terms(named, "b", cat.find(KEY))  # already in cluster terms: as it is
    assert again.details["device"] == "b/cpu" and "b/b/cpu" not in again.message
