"""The example pipeline and its demo run on both backends and compute every key exactly once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_demo_works_the_example_pipeline_under_the_supervisor(db, tmp_path):
    env = dict(db.env, DJS_EXAMPLE_PREFIX=db.prefix, DJS_EXAMPLE_SLOW_SECONDS="0.05", PYTHONPATH=str(ROOT),
               DJS_DEMO_LOG=str(tmp_path / "supervisor.log"), DJSUPERVISOR_RUNTIME_DIR=str(tmp_path / "run"))  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=150)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every session analysed" in result.stdout
    assert "the supervisor exited with status 0" in result.stdout
    assert "WORKER    SLOT  PID" in result.stdout  # djsupervisor status was shown
    connection = db.connection
    q = connection.adapter.quote_identifier
    schema = q(f"{db.prefix}_pipeline")
    counts = {}
    for table in ("session", "_recording", "__spikes", "__spikes__channel", "__summary"):
        counts[table] = connection.query(f"SELECT COUNT(*) FROM {schema}.{q(table)}").fetchone()[0]
    assert counts == {"session": 12, "_recording": 12, "__spikes": 12, "__spikes__channel": 48, "__summary": 12}
    for job_table in ("~~recording", "~~spikes", "~~summary"):
        assert connection.query(f"SELECT COUNT(*) FROM {schema}.{q(job_table)}").fetchone()[0] == 0
