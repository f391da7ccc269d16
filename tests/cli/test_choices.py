"""A bad value of an option that takes one of a few words, or a bounded number, exits 2 before
anything is sent, naming the option and what it takes (with ``--json``: the error object with
``details.param``); the words are the API's (``modelkeeper.cli.choices``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
from typer.testing import CliRunner

from modelkeeper.api import schemas
from modelkeeper.cli import choices
from modelkeeper.cli.app import app
from modelkeeper.orchestrator.jobs import JobState
from modelkeeper.registry.store import Registry

runner = CliRunner()
#: No service listens there: a value checked on this side never gets that far.
NOWHERE = "http://127.0.0.1:9"


def _words(annotation: Any) -> set[str]:
    return {a for a in get_args(annotation) if isinstance(a, str)} | {
        w for a in get_args(annotation) if a is not type(None) for w in get_args(a)
    }


@pytest.mark.parametrize(
    ("cli_words", "api_words"),
    [
        (choices.Priority, schemas.PriorityName),
        (choices.Dtype, schemas.LoadBody.model_fields["dtype"].annotation),
        (choices.StorageDtype, schemas.LoadBody.model_fields["storage_dtype"].annotation),
        (choices.Level, schemas.ValidateBody.model_fields["level"].annotation),
        (choices.Presence, schemas.SearchBody.model_fields["status"].annotation),
        (choices.SortKey, schemas.SearchBody.model_fields["sort"].annotation),
    ],
)
def test_the_words_are_the_api_s(cli_words: Any, api_words: Any) -> None:
    assert set(get_args(cli_words)) == _words(api_words)


def test_the_job_states_are_the_service_s() -> None:
    assert set(get_args(choices.JobState)) == {s.value for s in JobState}


BAD = [
    (["load", "m", "--dtype", "fp16"], "--dtype", "dtype", "'float32', 'float16', 'bfloat16'"),
    (["load", "m", "--storage-dtype", "fp8"], "--storage-dtype", "storage_dtype", "'float8_e4m3fn'"),
    (["load", "m", "--priority", "urgent"], "--priority", "priority", "'low', 'normal', 'high', 'critical'"),
    (["load", "m", "--timeout", "-1"], "--timeout", "timeout", "above 0 and at most 86400"),
    (["load", "m", "--keep-alive", "-2"], "--keep-alive", "keep_alive", "greater than or equal to -1"),
    (["validate", "m", "--level", "deep"], "--level", "level", "'header', 'weights', 'functional'"),
    (["jobs", "--state", "bogus"], "--state", "state", "'queued', 'running', 'succeeded'"),
    (["ls", "--status", "gone?"], "--status", "status", "'ok', 'missing', 'all'"),
    (["ls", "--sort", "date"], "--sort", "sort", "'name', 'type', 'base', 'size', 'created'"),
    (["benchmark", "m", "--steps", "0"], "--steps", "steps", "1"),
]


@pytest.mark.parametrize(("args", "option", "param", "said"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_value_exits_2_naming_the_option(args: list[str], option: str, param: str, said: str) -> None:
    env = {"MODELKEEPER_URL": NOWHERE, "COLUMNS": "200"}
    plain = runner.invoke(app, args, env=env)
    text = " ".join(plain.stderr.replace("│", " ").split())
    assert plain.exit_code == 2 and f"Invalid value for '{option}'" in text and said in text, plain.output
    assert "Value error" not in text, text  # typer's word before a choice's, left out
    for where in (len(args), 1):  # --json after the command, or right after its name
        result = runner.invoke(app, [*args[:where], "--json", *args[where:]], env=env)
        assert result.exit_code == 2, result.output
        body = json.loads(result.stdout)
        assert body["details"] == {"param": param} and body["error_code"] == "INVALID_REQUEST", body
        assert body["error"].startswith(f"Invalid value for '{option}': ") and said in body["error"], body


def test_ls_takes_every_type_its_error_lists(tmp_path: Path) -> None:
    """``ls --type checkpoint`` is taken: the error for an unknown type lists it, beside the stored
    values, and every word listed there (and its plural) is taken."""
    db = str(tmp_path / "registry.sqlite3")
    Registry.open(db).close()
    refused = runner.invoke(app, ["ls", "--type", "bogus", "--db", db, "--json"])
    body = json.loads(refused.stdout)
    assert refused.exit_code == 1 and "checkpoint" in body["error"], body
    words = [*body["details"]["valid"], *body["details"]["aliases"]]
    assert "checkpoint" in words and "main" in words
    for word in words:
        for typed in (word, word + "s"):
            listed = runner.invoke(app, ["ls", "--type", typed, "--db", db, "--json"])
            assert listed.exit_code == 0 and json.loads(listed.stdout)["total"] == 0, (typed, listed.output)
    help_text = " ".join(runner.invoke(app, ["ls", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "checkpoint" in help_text and "textual_inversion" in help_text
