"""Every ``MODELKEEPER_*`` variable the source reads is known to ``serve``'s check for typos, and a
typo is named with the closest known variable."""

from __future__ import annotations

import re
from pathlib import Path

from modelkeeper.orchestrator.settings import CLUSTER_ENV_PREFIX, OTHER_ENV, Settings, unknown_env

SRC = Path(__file__).resolve().parents[1] / "src" / "modelkeeper"


def test_every_variable_the_source_reads_is_known() -> None:
    read = set()
    for path in SRC.rglob("*.py"):
        read |= set(re.findall(r"MODELKEEPER_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")))
    read = {n for n in read if not n.startswith(CLUSTER_ENV_PREFIX.rstrip("_"))}  # cluster mode's own
    fields = {f"MODELKEEPER_{name.upper()}" for name in Settings.model_fields}
    unknown = read - fields - OTHER_ENV
    assert unknown == set(), f"read by the source but unknown to unknown_env: {sorted(unknown)}"
    assert unknown_env(dict.fromkeys(read, "1")) == []


def test_a_typo_is_named_with_the_closest_variable() -> None:
    environ = {"MODELKEEPER_MODEL_ROOT": "/models", "MODELKEEPER_PORT": "9000", "HOME": "/root",
               "MODELKEEPER_CLUSTER_ADDRESS": "auto", "MODELKEEPER_NOPE": "1"}  # fmt: skip
    assert unknown_env(environ) == [
        "MODELKEEPER_MODEL_ROOT: not a modelkeeper setting, ignored (did you mean MODELKEEPER_MODEL_ROOTS?)",
        "MODELKEEPER_NOPE: not a modelkeeper setting, ignored",
    ]
