"""A worker whose callable step records what a subprocess of the worker inherits: it runs `env` into
DJS_TEST_ENV_OUT. It stops by itself after a second (run_duration), so `djsupervisor run` and a hand-run
`DataJointWorker.run()` end on their own. Used by tests/supervisor/test_secrets.py; connects nothing at import."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from djsupervisor import DataJointWorker

PREFIX = os.environ["DJS_TEST_PREFIX"]


def record_environment() -> None:
    """Write the environment a subprocess gets (as a make() starting a shell command would) to DJS_TEST_ENV_OUT."""
    output = subprocess.run(["env"], capture_output=True, text=True, timeout=10, check=True).stdout
    target = Path(os.environ["DJS_TEST_ENV_OUT"])
    target.with_suffix(".part").write_text(output)
    target.with_suffix(".part").rename(target)


envdump = DataJointWorker("envdump", f"{PREFIX}_workers", sleep_duration=0.2, run_duration=1)
envdump(record_environment)
