"""Property-based tests of the service against its own OpenAPI schema (schemathesis).

The default run generates a bounded, derandomized set of requests per operation from the
schema and sends them to the real app in-process (ASGI); every response must be no 5xx,
a documented status, of the documented content type and match its schema. The slow test
runs the schemathesis CLI with every check (``--checks all``) and thousands of cases
against a real ``vocabmetric serve`` on loopback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from conftest import serve_subprocess  # noqa: E402

#: Per operation, in the default suite: 8 operations x 25 cases, well under a minute.
EXAMPLES = 25
#: Rules an OpenAPI schema cannot state, so a schema-valid request may still be a documented
#: 400: GET /neighbors takes exactly one of ``token`` and ``id`` (query parameters have no oneOf).
CROSS_PARAMETER_RULES = {"GET /neighbors": [schemathesis.checks.positive_data_acceptance]}


def operations(small_store):
    from vocabmetric.query.service import create_app

    loaded = schemathesis.openapi.from_asgi("/openapi.json", create_app(small_store.path))
    return [result.ok() for result in loaded.get_all_operations()]


def test_the_service_answers_every_generated_request_as_documented(small_store):
    """Hypothesis over each operation's schema (schemathesis' strategies; its pytest plugin
    does not load under this pytest): no 5xx, every status documented, bodies match."""
    ops = operations(small_store)
    assert {op.label for op in ops} >= {"GET /neighbors", "POST /neighbors", "GET /cost", "POST /cost"}
    for operation in ops:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_as_documented(case):
            response = case.call_and_validate(excluded_checks=CROSS_PARAMETER_RULES.get(operation.label, []))
            assert response.status_code < 500, (case.path, case.query, case.body)

        answers_as_documented()


#: The same cross-parameter rules for the CLI run (a schemathesis.toml): there a 400 (token
#: and id) or a 422 (the work budget, ids x V for an exact metric) answers a schema-valid request.
CLI_CONFIG = """
[[operations]]
include-path = "/neighbors"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "422"]
"""


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing(small_store, tmp_path):
    """``st run --checks all``: thousands of cases (coverage, fuzzing, stateful), every check,
    against a real ``vocabmetric serve`` on loopback."""
    import re

    bin_dir = str(Path(sys.executable).parent)
    exe = shutil.which("st", path=bin_dir) or shutil.which("schemathesis", path=bin_dir)
    assert exe, "schemathesis CLI not installed (pip install -e '.[dev]')"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CLI_CONFIG)
    with serve_subprocess(small_store.path, tmp_path / "serve.log", "--no-access-log") as url:
        done = subprocess.run([exe, "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
                               "--max-examples", "500", "--seed", "0", "--no-color"],
                              capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", done.stdout).group(1))
    assert generated >= 1000, done.stdout[-2000:]
