"""Fuzzing the OpenAPI spec with schemathesis against the real service: no input gives a 5xx.

Schemathesis' own pytest plugin does not run under pytest 9, so each operation's strategy is
driven with hypothesis directly."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from modelkeeper.testing.service import RunningService
from tests.api.conftest import ServiceFactory

#: per operation, valid and invalid inputs mixed; MODELKEEPER_FUZZ_EXAMPLES=500 digs deeper
EXAMPLES = int(os.environ.get("MODELKEEPER_FUZZ_EXAMPLES", "30"))

#: Not checked: that every schema-valid request is accepted. The service refuses some on meaning,
#: not shape: a model that does not fit (507), a cache request with neither ``model_id`` nor
#: ``component_id`` or a load body without ``model_id`` where the path names none (422).
NOT_CHECKED = [positive_data_acceptance]


@pytest.fixture(scope="module")
def fuzzed(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(hash_on_start=False) as running:
        yield running


def test_no_input_gives_a_server_error(fuzzed: RunningService) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    statuses: Counter[int] = Counter()
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.endswith("events"):
            continue  # endless event streams
        operations += 1
        # valid inputs and invalid ones (wrong types, missing fields, out-of-range values)
        strategy = op.as_strategy(GenerationMode.POSITIVE) | op.as_strategy(GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def call(case: schemathesis.Case) -> None:
            response = case.call(timeout=60)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code}: {response.text[:300]}"
            )
            # every other built-in check: status, content type, headers and body as the spec documents them
            case.validate_response(response, excluded_checks=NOT_CHECKED)

        call()
    assert operations >= 45
    assert sum(statuses.values()) >= operations * 5
    print(
        f"fuzzed {operations} operations, {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}"
    )
