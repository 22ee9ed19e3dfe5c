"""schemathesis with every check (`--checks all`) against a real daemon, the ledger path
parameter set to a real ledger so requests reach the handlers (issue 13 section 5).

The reference run, as a user would type it: the schemathesis CLI with its coverage phase
(undeclared methods, boundary values, missing auth), fuzzing and stateful phases. Bounded and
reproducible: a fixed seed and `--max-examples`. Only the SSE stream is left out (it never
ends by design).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import DaemonProcess, subprocess_env

TOKEN = "schemathesis-token"
MAX_EXAMPLES = 25
SEED = 20261201

CONFIG = """
[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "kind-counter"
"""


# A reused `Idempotency-Key` with another body is 422 by the IETF draft (DESIGN, docs/daemon.md):
# a state-dependent answer to a schema-valid request, which schemathesis provokes by sending the
# same generated key with different bodies. Only the two keyed append operations accept it; see
# docs/conformance.md ("deliberate differences").
SETTINGS = """
[parameters]
"path.ledger" = "main"

[[operations]]
include-path-regex = "/records(/batch)?$"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""


def test_schemathesis_with_every_check_passes(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(CONFIG)
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(SETTINGS)
    daemon = DaemonProcess(config, NUCLEUS_TOKEN=TOKEN)
    try:
        url = daemon.wait_listening()
        command = [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(settings),
            "run", f"{url}/openapi.json",
            "--checks", "all",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED),
            "--exclude-path-regex", r".*/stream$",
            "--workers", "1",
            "--no-color",
        ]  # fmt: skip
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=subprocess_env(),
            timeout=600,
            check=False,
        )
    finally:
        daemon.close()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    assert selected is not None, report
    assert f"Tested: {selected.group(1)}" in report, report  # every selected operation ran
    assert re.search(r"(\d+) generated, \1 passed", report), report  # no failure, no error
    assert "FAILURES" not in report, report
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in report, report
    assert "Unsupported regex" not in report, report  # the `kind` pattern is usable as written
