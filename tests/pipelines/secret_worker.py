"""A worker whose module sets the database password in `dj.config` when imported (as a lab's pipeline
module may), and whose callable step leaks it: it runs `env` (what a make()'s subprocess inherits) into
DJS_TEST_ENV_OUT, then fails with the password in its message and in its keyword arguments (RegisteredWorker's
settings). Used by tests/supervisor/test_secrets.py; connects nothing at import."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import datajoint as dj

from djsupervisor import DataJointWorker

dj.config["database.password"] = os.environ["DJS_TEST_MODULE_PASSWORD"]
PREFIX = os.environ["DJS_TEST_PREFIX"]


def leak(login: str) -> None:
    """Record a subprocess's environment, then fail naming the password."""
    output = subprocess.run(["env"], capture_output=True, text=True, timeout=10, check=True).stdout
    Path(os.environ["DJS_TEST_ENV_OUT"]).write_text(output)
    raise RuntimeError(f"cannot log in with {login} (dj.config has {dj.config['database.password']})")


secret = DataJointWorker("secret", f"{PREFIX}_workers", sleep_duration=0.3)
secret(leak, login=dj.config["database.password"])
