"""Property-based fuzzing over the app's own OpenAPI schema (schemathesis + hypothesis):
whatever arrives, the answer is never a 5xx, and every error has OpenAI's shape.

Bounded: a fixed number of examples per operation, tiny max_tokens, and media URLs
limited to a domain that is refused before any DNS lookup, so the run stays short.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings


@pytest.fixture(scope="module")
def fuzz_server(make_module_server):
    return make_module_server(max_tokens=8, allowed_media_domains="media.invalid", max_queue=64,
                              media_fetch_timeout_seconds=1.0)


def test_fuzzed_requests_never_get_a_server_error(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    for operation in operations:
        check_operation(operation)


def check_operation(operation) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(timeout=30)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    run()
